"""The second launch of a split-K GEMM: add the fp32 partial products of the K splits (and the bias).

Decode-sized GEMMs (a few rows of activations) have too few output tiles to
fill a GPU, and they are bound by reading the weight, so the quantized GEMMs
split K across programs; each split writes an fp32 partial [M, N] here.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _sum_splits_kernel(partials_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(partials_ptr + split * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(partials: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """partials fp32 [splits, M, N] -> their sum (+ bias) [M, N] in out_dtype, in one launch."""
    splits, m, n = partials.shape
    out = torch.empty(m, n, dtype=out_dtype, device=partials.device)
    if m:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](partials, bias if bias is not None else out, out, m * n, n,
                                                         SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block)
    return out


def split_k_output(m: int, n: int, k: int, block_k: int, splits: int, dtype: torch.dtype, device: torch.device
                   ) -> tuple[torch.Tensor, int]:
    """(output [splits, M, N], K per split) of a launch split `splits` ways along K in whole block_k tiles
    (fewer splits when K is short): one split writes `dtype` directly, several write fp32 partials."""
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    return torch.empty(splits, m, n, dtype=dtype if splits == 1 else torch.float32, device=device), k_per_split


def reduce_splits(out: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The [M, N] result of a split_k_output launch (with one split the kernel added the bias itself)."""
    return out[0] if out.shape[0] == 1 else sum_splits(out, bias, dtype)


def choose_split_k(tiles: int, k_tiles: int, programs_wanted: int, max_splits: int = 16) -> int:
    """K splits so that tiles * splits reaches programs_wanted, keeping each split at least 4 K tiles long."""
    wanted = math.ceil(programs_wanted / tiles)
    return max(1, min(wanted, k_tiles // 4, max_splits))


@functools.cache
def multiprocessor_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
