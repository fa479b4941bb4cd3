"""Random paged-attention problems, shared by the kernel tests and benchmarks.

Blocks are handed out in a random order, so a sequence's pages are scattered
through the cache as they are in a running engine, and every value is random
(never zeros: zeros hide unwritten outputs and wrong indexing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedProblem:
    q: torch.Tensor  # [sum(query_lens), num_heads, head_dim]
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    scale: float


def make_paged_problem(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    spare_blocks: int = 3,
    seed: int = 0,
) -> PagedProblem:
    """A batch whose sequence b has seq_lens[b] cached tokens, the last query_lens[b] of them queried."""
    if any(q > s for q, s in zip(query_lens, seq_lens)):
        raise ValueError("a query cannot be longer than its sequence")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    max_blocks = max(blocks_needed)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_needed):
        block_tables[b, :n] = order[used : used + n]
        used += n

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return PagedProblem(
        q=randn(starts[-1], num_heads, head_dim),
        k_cache=randn(*cache_shape),
        v_cache=randn(*cache_shape),
        block_tables=block_tables.to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
    )
