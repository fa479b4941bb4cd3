"""Fused mixture-of-experts MLP in Triton: tokens sorted by expert, then two grouped GEMMs.

A loop over experts launches 3 GEMMs per expert (384 for Qwen3-30B-A3B's 128
experts) and gathers each expert's tokens in between. Here:

1. align_by_expert (torch, on the device, no host sync): the T * K (token,
   choice) pairs are sorted by expert and each expert's run is padded to a
   multiple of BLOCK_M, so every BLOCK_M rows of the sorted order belong to one
   expert. Shapes depend on T, K and E only, so the launch is CUDA-graph safe.
2. _grouped_gemm_kernel, twice: each program computes one BLOCK_M x BLOCK_N
   tile of one expert, gathering its rows of A through the sorted ids, so each
   expert's weights are read once per N tile however many tokens chose it.
   The first GEMM (x @ w13^T) writes [T * K, 2 * I]; silu(gate) * up follows;
   the second (@ w2^T) multiplies each row by its routing weight.
3. The K rows of a token are summed.

Decode batches take a shorter path: when so few pairs are routed that hardly
two share an expert, sorting buys nothing and its dozen small launches cost
more than the GEMMs. _expert_gemv_kernel then reads each pair's expert rows
directly (one program per pair and N tile), and the layer is four launches.

Semantics are those of kernels/moe_reference.fused_moe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fused import silu_and_mul
from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous


@dataclass(frozen=True)
class MoeLaunchConfig:
    """Tile sizes of the grouped GEMMs (benchmarks sweep these)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class GemvLaunchConfig:
    """Tile sizes of the per-pair GEMV path (few pairs, hardly any sharing an expert)."""

    block_n: int
    block_k: int
    num_warps: int


def default_moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoeLaunchConfig | GemvLaunchConfig:
    """The GEMV path while pairs rarely share an expert, then small tiles in M (decode), then wide ones."""
    num_pairs = num_tokens * top_k
    under_interpreter = interpreted()
    if num_tokens == 1 or 4 * num_pairs <= num_experts:  # one token's K choices are distinct experts
        return GemvLaunchConfig(block_n=16, block_k=32, num_warps=1) if under_interpreter else \
            GemvLaunchConfig(block_n=16, block_k=64, num_warps=8)
    if under_interpreter:
        return MoeLaunchConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)
    if num_pairs <= 2 * num_experts:
        return MoeLaunchConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
    return MoeLaunchConfig(block_m=64, block_n=128, block_k=64, num_warps=8, num_stages=3)


@dataclass
class ExpertAlignment:
    sorted_ids: torch.Tensor  # [max_padded] int32: flat (token * K + choice) index, num_pairs for padding
    block_experts: torch.Tensor  # [max_padded // block_m] int32: expert of each BLOCK_M rows, -1 past the end
    num_padded: torch.Tensor  # [1] int32: rows in use (the rest are never computed)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Sort the (token, choice) pairs by expert, each expert's run padded to a multiple of block_m."""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    first_of_expert = counts.cumsum(0) - counts
    rank = torch.arange(num_pairs, device=device) - first_of_expert[sorted_experts]
    max_padded = num_pairs + num_experts * (block_m - 1)
    max_padded = (max_padded + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_start[sorted_experts] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts, -1).to(torch.int32)
    return ExpertAlignment(sorted_ids, block_experts, padded_end[-1:].to(torch.int32))


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, w_ptr, c_ptr, weights_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr,
    num_pairs, N, K,
    stride_am, stride_we, stride_wn, stride_cm,
    A_ROWS_PER_PAIR: tl.constexpr,  # A holds one row per token (K choices share it) or one per pair
    TOP_K: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """C[pair, n] = A[row(pair)] . W[expert, n] (x routing weight) for one expert's BLOCK_M pairs."""
    wait_for_previous(PDL)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + offs_m)
    pair_valid = pairs < num_pairs
    if A_ROWS_PER_PAIR:
        a_rows = pairs.to(tl.int64)
    else:
        a_rows = (pairs // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_block = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    w_block = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_valid = offs_k + k_start < K
        a = tl.load(a_block, mask=pair_valid[:, None] & k_valid[None, :], other=0.0)
        w = tl.load(w_block, mask=k_valid[:, None] & n_valid[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_block += BLOCK_K
        w_block += BLOCK_K
    if MUL_ROUTING_WEIGHT:
        routing = tl.load(weights_ptr + pairs, mask=pair_valid, other=0.0)
        acc = acc * routing[:, None]
    c = c_ptr + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=pair_valid[:, None] & n_valid[None, :])


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, alignment: ExpertAlignment,
                  topk_weights: torch.Tensor | None, top_k: int, rows_per_pair: bool,
                  config: MoeLaunchConfig) -> None:
    num_experts, n, k = w.shape
    grid = (alignment.block_experts.numel(), triton.cdiv(n, config.block_n))
    _grouped_gemm_kernel[grid](
        a, w, out, topk_weights if topk_weights is not None else out,
        alignment.sorted_ids, alignment.block_experts, alignment.num_padded,
        out.shape[0], n, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_ROWS_PER_PAIR=rows_per_pair, TOP_K=top_k, MUL_ROUTING_WEIGHT=topk_weights is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(a.device),
    )


@triton.jit
def _expert_gemv_kernel(
    a_ptr, w_ptr, c_ptr, weights_ptr, expert_ids_ptr,
    N, K,
    stride_am, stride_we, stride_wn, stride_cm,
    A_ROWS_PER_PAIR: tl.constexpr, TOP_K: tl.constexpr, MUL_ROUTING_WEIGHT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """C[pair, n] = A[row(pair)] . W[expert(pair), n] (x routing weight) for one pair's BLOCK_N outputs."""
    wait_for_previous(PDL)
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(expert_ids_ptr + pair).to(tl.int64)
    if A_ROWS_PER_PAIR:
        a_row = pair.to(tl.int64)
    else:
        a_row = (pair // TOP_K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_block = a_ptr + a_row * stride_am + offs_k
    w_block = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_valid = offs_k + k_start < K
        a = tl.load(a_block, mask=k_valid, other=0.0).to(tl.float32)
        w = tl.load(w_block, mask=n_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
        acc += w * a[None, :]
        a_block += BLOCK_K
        w_block += BLOCK_K
    out = tl.sum(acc, axis=1)
    if MUL_ROUTING_WEIGHT:
        out = out * tl.load(weights_ptr + pair)
    tl.store(c_ptr + pair.to(tl.int64) * stride_cm + offs_n, out.to(c_ptr.dtype.element_ty), mask=n_valid)


def _expert_gemv(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, expert_ids: torch.Tensor,
                 topk_weights: torch.Tensor | None, top_k: int, rows_per_pair: bool,
                 config: GemvLaunchConfig) -> None:
    num_experts, n, k = w.shape
    grid = (out.shape[0], triton.cdiv(n, config.block_n))
    _expert_gemv_kernel[grid](
        a, w, out, topk_weights if topk_weights is not None else out, expert_ids,
        n, k,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_ROWS_PER_PAIR=rows_per_pair, TOP_K=top_k, MUL_ROUTING_WEIGHT=topk_weights is not None,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        **launch_options(a.device),
    )


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K] float32
    topk_ids: torch.Tensor,  # [T, K]
    activation: str = "silu",
    config: MoeLaunchConfig | GemvLaunchConfig | None = None,
) -> torch.Tensor:
    """[T, H]: each token's top-K experts' gated MLPs, weighted and summed (see kernels.moe_reference)."""
    if activation != "silu":
        raise ValueError(f"fused_moe supports the silu activation only, not {activation!r}")
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    if w13.shape[2] != hidden or w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"expert weights {tuple(w13.shape)} / {tuple(w2.shape)} do not fit hidden size {hidden}")
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("fused_moe needs rows with a contiguous last dimension")
    config = config or default_moe_config(num_tokens, top_k, num_experts)
    routing = topk_weights.flatten().float().contiguous()
    gate_up = torch.empty(num_pairs, two_i, dtype=x.dtype, device=x.device)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    if isinstance(config, GemvLaunchConfig):
        expert_ids = topk_ids.flatten().to(torch.int32)
        _expert_gemv(x, w13, gate_up, expert_ids, None, top_k, rows_per_pair=False, config=config)
        _expert_gemv(silu_and_mul(gate_up), w2, down, expert_ids, routing, top_k, rows_per_pair=True, config=config)
    else:
        alignment = align_by_expert(topk_ids, num_experts, config.block_m)
        _grouped_gemm(x, w13, gate_up, alignment, None, top_k, rows_per_pair=False, config=config)
        _grouped_gemm(silu_and_mul(gate_up), w2, down, alignment, routing, top_k, rows_per_pair=True, config=config)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
