"""Split-K for decode-sized GEMMs: where the K splits write, and how their partial sums are added.

Decode-sized GEMMs (a few rows of activations) have too few output tiles to
fill a GPU, and they are bound by reading the weight, so the quantized GEMMs
split K across programs; each split writes an fp32 partial [M, N]. The partials
are added in one of two ways:

- LAST_SPLIT_SUMS: each program counts itself in on its output tile with an
  atomic; the program that arrives last adds the tile's partials (and the bias),
  writes the result and resets the counter. No second launch, which at batch 1
  costs about as much as the sum itself.
- SUM_LAUNCH: a second small launch adds them (sum_splits). Used where a kernel's
  config says so (measured faster for the W4A16 tensor-core kernel), where the
  counters do not fit, and for A/B runs in benchmarks/quant_gpu.py.

Counters live in one zeroed int32 buffer per device, reset by the programs that
use them, so they are zero between launches (launches on one stream do not overlap).
Two split GEMMs running at once on two streams of a device would share them: the
engine runs its forward pass on one stream, and a new side stream doing GEMMs
must pass reduce_in_kernel=False or get counters of its own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.gpu import device_index, multiprocessor_count
from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous

# How a launch's K splits reach the output (the kernels' SPLIT_MODE).
ONE_SPLIT = tl.constexpr(0)  # no split: the program writes the output (and adds the bias)
SUM_LAUNCH = tl.constexpr(1)  # splits write fp32 partials; sum_splits adds them in a second launch
LAST_SPLIT_SUMS = tl.constexpr(2)  # splits write fp32 partials; the last to finish a tile adds them
MAX_COUNTED_TILES = 1 << 16  # output tiles one launch may count (256 KiB of counters per device)


@triton.jit
def store_split_k(acc, offs_m, offs_n, M, N, pid_k, splits, tile, partials_ptr, out_ptr, bias_ptr, counters_ptr,
                  HAS_BIAS: tl.constexpr, SPLIT_MODE: tl.constexpr):
    """Write one program's fp32 tile acc [BLOCK_M, BLOCK_N] of split pid_k (of `splits`) the SPLIT_MODE way.

    tile numbers the output tile among the launch's tiles (its counter). With LAST_SPLIT_SUMS the
    partial is released (a barrier, then the atomic's release at GPU scope) before the program
    counts in, and the last program reads the others' partials from L2 (.cg), after its acquire.
    """
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    index = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_MODE == ONE_SPLIT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + index, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partials_ptr + pid_k * M * N + index, acc, mask=mask)
        if SPLIT_MODE == LAST_SPLIT_SUMS:
            tl.debug_barrier()
            arrived = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == splits - 1:
                total = tl.zeros_like(acc)
                for split in range(splits):
                    total += tl.load(partials_ptr + split * M * N + index, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + index, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(counters_ptr + tile, 0)


@triton.jit
def _sum_splits_kernel(partials_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLITS):
        acc += tl.load(partials_ptr + split * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def sum_splits(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """partials fp32 [splits, M, N] -> their sum (+ bias) written into out [M, N], in one launch."""
    splits, m, n = partials.shape
    if m:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](partials, bias if bias is not None else out, out, m * n, n,
                                                         SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block,
                                                         **launch_options(out.device))
    return out


@dataclass(frozen=True)
class SplitK:
    """Where one split-K launch writes: pass partials, out and counters to the kernel with SPLIT_MODE = mode."""

    mode: int  # ONE_SPLIT, SUM_LAUNCH or LAST_SPLIT_SUMS
    splits: int
    k_per_split: int
    partials: torch.Tensor  # fp32 [splits, M, N] (the output itself with one split)
    out: torch.Tensor  # [M, N] in the activation dtype
    counters: torch.Tensor  # int32, one per output tile (LAST_SPLIT_SUMS), else any tensor

    def has_bias_in_kernel(self, bias: torch.Tensor | None) -> bool:
        """Whether the kernel adds the bias (SUM_LAUNCH adds it in its second launch)."""
        return bias is not None and self.mode != SUM_LAUNCH.value

    def result(self, bias: torch.Tensor | None) -> torch.Tensor:
        """The [M, N] output, after the second launch where the mode has one."""
        return sum_splits(self.partials, bias, self.out) if self.mode == SUM_LAUNCH.value else self.out


def plan_split_k(m: int, n: int, k: int, block_k: int, splits: int, tiles: int, dtype: torch.dtype,
                 device: torch.device, reduce_in_kernel: bool = True) -> SplitK:
    """The outputs of a launch of `tiles` output tiles split `splits` ways along K in whole block_k tiles
    (fewer splits when K is short). The last split of a tile adds the partials where reduce_in_kernel
    allows it: on a GPU, with counters for every tile, outside a CUDA-graph capture that would have to
    allocate them."""
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split) if k else 1
    out = torch.empty(m, n, dtype=dtype, device=device)
    if splits == 1:
        return SplitK(ONE_SPLIT.value, 1, k_per_split, out.unsqueeze(0), out, out)
    partials = torch.empty(splits, m, n, dtype=torch.float32, device=device)
    counters = _counters(device) if reduce_in_kernel and tiles <= MAX_COUNTED_TILES else None
    if counters is None:
        return SplitK(SUM_LAUNCH.value, splits, k_per_split, partials, out, out)
    return SplitK(LAST_SPLIT_SUMS.value, splits, k_per_split, partials, out, counters)


def _counters(device: torch.device) -> torch.Tensor | None:
    """The device's tile counters (all zero; made on first use), or None during a CUDA-graph capture that
    would have to make them. Under the interpreter they are CPU tensors, and the sum runs the same way."""
    key = f"cuda:{device_index(device)}" if device.type == "cuda" else str(device)
    if key not in _COUNTERS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _COUNTERS[key] = torch.zeros(MAX_COUNTED_TILES, dtype=torch.int32, device=key)
    return _COUNTERS[key]


_COUNTERS: dict[str, torch.Tensor] = {}


def split_count(tiles: int, k_tiles: int, requested: int, programs_per_sm: int, device: torch.device) -> int:
    """`requested` K splits, or about programs_per_sm programs per SM of the device (two splits under the
    interpreter, to exercise the path)."""
    if requested:
        return requested
    if interpreted():
        return min(2, k_tiles)
    return choose_split_k(tiles, k_tiles, programs_per_sm, multiprocessor_count(device_index(device)))


@functools.cache  # a pure function of a launch's shape, asked on every launch that does not give its splits
def choose_split_k(tiles: int, k_tiles: int, programs_per_sm: int, processors: int, max_splits: int = 16) -> int:
    """K splits for `tiles` output tiles of k_tiles K tiles each, every split at least 4 K tiles long.

    The launch lasts about as long as its busiest SM: ceil(programs / SMs) programs of the longest split.
    Of the split counts within 5% of the least such work, the one nearest ceil(programs_per_sm * SMs /
    tiles) wins (more programs hide more latency). Aiming at that count alone can leave a partial last
    round: Llama-3.1-8B's down_proj W4A16 GEMV took 19.1 us in 9 splits (288 programs on 132 SMs) against
    14.4 in 8.
    """
    def busiest_sm_k_tiles(splits: int) -> int:
        per_split = math.ceil(k_tiles / splits)
        return math.ceil(tiles * math.ceil(k_tiles / per_split) / processors) * per_split

    wanted = math.ceil(programs_per_sm * processors / tiles)
    work = {splits: busiest_sm_k_tiles(splits) for splits in range(1, max(1, min(k_tiles // 4, max_splits)) + 1)}
    least = min(work.values())
    return min((splits for splits, busiest in work.items() if busiest <= 1.05 * least),
               key=lambda splits: abs(splits - wanted))

