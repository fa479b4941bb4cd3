"""FP8 weights times one 16-bit activation row (batch-1 decode) on the CUDA cores, W8A16.

At one row a GEMM is bound by reading the weight, so the activation does not
need quantizing to FP8 for tensor cores: this GEMV multiplies the e4m3 weight
by the bf16/fp16 row directly. That drops the per-token quantization launch in
front of every FP8 linear and its rounding of the activations (the result is
closer to the 16-bit product than quant_reference.fp8_linear's).

Each program takes BLOCK_N weight rows (output features) over its K split, in
[BLOCK_N, BLOCK_K] tiles of 16-byte loads that stream through shared memory
(`tl.range` stages, as in kernels/w4a16.py's GEMV); products accumulate in fp32
and are reduced across K once. The per-channel weight scale multiplies the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous
from kernels.split_k import plan_split_k, split_count, store_split_k

GEMV_MAX_M = 1  # rows fp8_linear sends here
PROGRAMS_PER_SM = 4  # K splits until about this many programs per SM


@dataclass(frozen=True)
class Fp8GemvConfig:
    """Rows, K tile, warps, load pipeline depth and K splits of one launch (benchmarks sweep these)."""

    # The H200 sweep's (benchmarks/RESULTS.md, seventh session): 71 us for the 8B layer's four GEMMs, against
    # 80 for the Triton FP8 GEMM with its activation quantization, and 79 with 16 rows and four warps.
    block_n: int = 8
    block_k: int = 512
    num_warps: int = 2
    num_stages: int = 3  # > 1: loads go through shared memory, num_stages - 1 tiles ahead
    split_k: int = 0  # 0: about PROGRAMS_PER_SM programs per SM
    reduce_in_kernel: bool = True


DEFAULT_CONFIG = Fp8GemvConfig()


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, partials_ptr, out_ptr, counters_ptr, M, N, K, stride_xm,
                     k_per_split, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     EVEN: tl.constexpr, LOAD_STAGES: tl.constexpr, SPLIT_MODE: tl.constexpr, PDL: tl.constexpr):
    """out[m, n] = w_scale[n] * sum over K of x[m, k] * w[n, k]; this program adds its K split of row m."""
    wait_for_previous(PDL)
    pid_n, pid_k, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in tl.range(k_start, k_end, BLOCK_K, num_stages=LOAD_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + offs_n[:, None] * K + offs_k[None, :]
        if EVEN:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptr + row * stride_xm + offs_k)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < k_end)[None, :], other=0.0)
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=offs_k < k_end, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
    out = (tl.sum(acc, axis=1) * scale)[None, :]
    store_split_k(out, tl.full((1,), 0, tl.int32) + row, offs_n, M, N, pid_k, tl.num_programs(1),
                  row * tl.num_programs(0) + pid_n, partials_ptr, out_ptr, bias_ptr, counters_ptr, HAS_BIAS, SPLIT_MODE)


def fp8_weight_only_gemv(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         bias: torch.Tensor | None = None, config: Fp8GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (16-bit or fp32) @ (weight fp8 [N, K] * weight_scale [N])^T (+ bias) -> [M, N] in x's dtype."""
    config = config or (Fp8GemvConfig(block_n=16, block_k=32, num_warps=1, num_stages=1) if interpreted()
                        else DEFAULT_CONFIG)
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"FP8 weight {list(weight.shape)} does not match K={k}")
    x = x if x.stride(1) == 1 else x.contiguous()
    row_tiles = triton.cdiv(n, config.block_n)
    splits = split_count(row_tiles, triton.cdiv(k, config.block_k), config.split_k, PROGRAMS_PER_SM, x.device)
    plan = plan_split_k(m, n, k, config.block_k, splits, m * row_tiles, x.dtype, x.device, config.reduce_in_kernel)
    if m:
        weight_scale = weight_scale.float().contiguous()
        _fp8_gemv_kernel[(row_tiles, plan.splits, m)](
            x, weight.contiguous(), weight_scale, bias if bias is not None else weight_scale, plan.partials, plan.out,
            plan.counters, m, n, k, x.stride(0), plan.k_per_split, HAS_BIAS=plan.has_bias_in_kernel(bias),
            BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            EVEN=k % config.block_k == 0 and n % config.block_n == 0, LOAD_STAGES=config.num_stages,
            SPLIT_MODE=plan.mode, num_warps=config.num_warps, num_stages=config.num_stages,
            **launch_options(x.device))
    return plan.result(bias)
