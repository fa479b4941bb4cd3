"""Paged attention on CPU: batched gathers and one SDPA call per decode step.

kernels/reference.py states the semantics with a loop of small einsums per
sequence, each copying K/V once per query head; on CPU that loop was most of a
decode step. Here a decode step gathers every sequence's cached K/V with one
indexing operation and attends with one `scaled_dot_product_attention` call;
a prefill attends per sequence (each is a large operation already). Grouped
query heads are folded into the query length, [kv_heads, group * q_len, D],
so K/V are never repeated per query head.

Same signatures as the reference and the Triton kernels (engine.layers.attention
picks the backend). An FP8 cache is dequantized as it is gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import dequantize_kv, gather_kv, store_kvcache

__all__ = ["paged_decode_attention", "paged_prefill_attention", "store_kvcache"]


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Lq, Hq, D] -> [..., Hkv, group * Lq, D]: query head h reads KV head h // group."""
    *lead, num_q, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    q = q.reshape(*lead, num_q, num_kv_heads, group, head_dim)
    return q.movedim(-4, -2).reshape(*lead, num_kv_heads, group * num_q, head_dim)


def _ungrouped(out: torch.Tensor, num_q: int) -> torch.Tensor:
    """The inverse of _grouped: [..., Hkv, group * Lq, D] -> [..., Lq, Hq, D]."""
    *lead, num_kv_heads, rows, head_dim = out.shape
    out = out.reshape(*lead, num_kv_heads, rows // num_q, num_q, head_dim)
    return out.movedim(-2, -4).reshape(*lead, num_q, num_kv_heads * (rows // num_q), head_dim)


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every sequence's whole context gathered at once, padded positions masked, one SDPA call.

    With a sliding window, positions more than sliding_window - 1 before the query are masked too.
    """
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_blocks = -(-int(seq_lens.max()) // block_size)
    tables = block_tables[:, :num_blocks].long()
    # [B, blocks, block_size, Hkv, D] -> [B, Hkv, L, D]
    k = dequantize_kv(k_cache[tables], q.dtype, k_scale).flatten(1, 2).transpose(1, 2)
    v = dequantize_kv(v_cache[tables], q.dtype, v_scale).flatten(1, 2).transpose(1, 2)
    positions = torch.arange(num_blocks * block_size, device=q.device)
    lengths = seq_lens[:, None].to(positions.dtype)
    mask = positions[None, :] < lengths
    if sliding_window is not None:
        mask &= positions[None, :] >= lengths - sliding_window
    mask = mask[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(
        _grouped(q[:, None], num_kv_heads), k, v, attn_mask=mask, scale=scale
    )
    return _ungrouped(out, 1)[:, 0]


def paged_prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim], queries of B sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including this step's tokens
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention: the one-token queries of a mixed step go through one decode call."""
    starts = query_start_loc.tolist()
    query_lens = [hi - lo for lo, hi in zip(starts[:-1], starts[1:])]
    out = torch.empty_like(q)
    single = [b for b, n in enumerate(query_lens) if n == 1]
    if single:
        rows = torch.tensor([starts[b] for b in single], device=q.device)
        picked = torch.tensor(single, device=q.device)
        out[rows] = paged_decode_attention(
            q[rows], k_cache, v_cache, block_tables[picked], seq_lens[picked], scale, sliding_window, k_scale, v_scale
        )
    num_kv_heads = k_cache.shape[2]
    lens = seq_lens.tolist()
    for b, num_q in enumerate(query_lens):
        if num_q <= 1:
            continue
        lo, seq_len = starts[b], lens[b]
        k = dequantize_kv(gather_kv(k_cache, block_tables[b], seq_len), q.dtype, k_scale).transpose(0, 1)  # [Hkv, L, D]
        v = dequantize_kv(gather_kv(v_cache, block_tables[b], seq_len), q.dtype, v_scale).transpose(0, 1)
        q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        causal = k_pos <= q_pos[:, None]  # [Lq, L]
        if sliding_window is not None:
            causal &= k_pos > q_pos[:, None] - sliding_window
        group = q.shape[1] // num_kv_heads
        mask = causal.repeat(group, 1)  # rows follow _grouped: group-major, then query position
        attended = F.scaled_dot_product_attention(
            _grouped(q[lo : lo + num_q], num_kv_heads), k, v, attn_mask=mask, scale=scale
        )
        out[lo : lo + num_q] = _ungrouped(attended, num_q)
    return out
