"""W4A16 GEMM: y = x @ dequant(qweight), dequantizing 4-bit weights tile by tile inside the matmul.

The layout is the one in kernels/quant_reference.py (int32 [K // 8, N], groups
along K). No dequantized copy of the weight ever exists: each program loads a
packed [BLOCK_K // 8, BLOCK_N] tile, expands it to [BLOCK_K, BLOCK_N] in
registers, applies its group's scale and zero, and feeds tl.dot.

Decode batches (M of 1..64) give too few output tiles to fill an H200's 132
SMs, and the GEMM is bound by reading the weight, so K is split across
programs (split-K) and the fp32 partial sums are added (with the bias) by one more small launch.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.quant_reference import PACK_FACTOR, SYMMETRIC_ZERO

MIN_DOT = 16  # the smallest M / N / K tl.dot accepts


@triton.jit
def _w4a16_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, k_per_split,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SYM_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Eight rows share one int32: load each once, shift its eight nibbles out, and lay them out as rows.
        offs_packed = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(qweight_ptr + offs_packed[:, None] * N + offs_n[None, :],
                         mask=(offs_packed[:, None] < k_end // 8) & mask_n[None, :], other=0)
        nibbles = (packed[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF  # [BLOCK_K // 8, 8, BLOCK_N]
        q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N)).to(tl.float32)
        if HAS_G_IDX:
            group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)[:, None]
            group_mask = mask_k[:, None] & mask_n[None, :]
        else:
            group = k0 // GROUP_SIZE  # BLOCK_K divides GROUP_SIZE: one group per tile
            group_mask = mask_n[None, :]
        scale = tl.load(scales_ptr + group * N + offs_n[None, :], mask=group_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group * N + offs_n[None, :], mask=group_mask, other=0.0).to(tl.float32)
        else:
            zero = SYM_ZERO
        w = ((q - zero) * scale).to(x_ptr.dtype.element_ty)
        acc += tl.dot(x, w, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_splits_kernel(partials_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """out = sum of the split-K partials (+ bias), cast to the output dtype, in one launch."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(partials_ptr + split * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class W4A16Config:
    """Tile sizes, warps and K splits of one launch (benchmarks sweep these)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0  # 0: choose from the shape (see choose_split_k)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _multiprocessor_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _largest_block_k(group_size: int, limit: int) -> int:
    """The largest power of two <= limit that divides the group size (so a tile never straddles groups)."""
    block = limit
    while block > MIN_DOT and group_size % block:
        block //= 2
    if group_size % block:
        raise ValueError(f"W4A16 group size {group_size} is not a multiple of {MIN_DOT}")
    return block


def default_config(m: int, group_size: int) -> W4A16Config:
    if _interpreted():
        return W4A16Config(block_m=MIN_DOT, block_n=32, block_k=_largest_block_k(group_size, 32), num_warps=1,
                           num_stages=1)
    block_m = min(128, max(MIN_DOT, triton.next_power_of_2(m)))
    block_n = 64 if m <= 64 else 128
    block_k = _largest_block_k(group_size, 128 if m <= 64 else 64)
    return W4A16Config(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4 if m <= 64 else 8,
                       num_stages=4 if m <= 64 else 3)


def choose_split_k(m: int, n: int, k: int, config: W4A16Config) -> int:
    """K splits so that about two programs run per SM, keeping each split at least 4 K-tiles long."""
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, config.block_k)
    target = 2 * tiles if _interpreted() else 2 * _multiprocessor_count(torch.cuda.current_device())
    wanted = math.ceil(target / tiles)
    return max(1, min(wanted, k_tiles // 4 if not _interpreted() else k_tiles, 16))


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) @ the W4A16 weight [K, N] -> [M, N] in x's dtype.

    With g_idx the group of each row is looked up (any order); otherwise rows
    k*G..(k+1)*G-1 form group k and group_size must be a multiple of 16.
    """
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * PACK_FACTOR != k:
        raise ValueError(f"qweight {list(qweight.shape)} does not pack K={k} input features")
    if not all(t is None or t.is_contiguous() for t in (qweight, scales, zeros, g_idx)):
        raise ValueError("W4A16 qweight, scales, zeros and g_idx must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    config = config or default_config(m, group_size if g_idx is None else MIN_DOT * 8)
    split_k = config.split_k or choose_split_k(m, n, k, config)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), config.block_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split_k)
        _w4a16_kernel[grid](
            x, qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
            bias if bias is not None and split_k == 1 else scales, out,
            m, n, k, x.stride(0), k_per_split,
            GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None,
            HAS_BIAS=bias is not None and split_k == 1, SYM_ZERO=float(SYMMETRIC_ZERO),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    if split_k == 1:
        return out[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, bias if bias is not None else y, y, m * n, n,
                                                         SPLITS=split_k, HAS_BIAS=bias is not None, BLOCK=block)
    return y
