"""F.linear on CPU for half-precision weights, at the speed the CPU allows.

torch computes a one-row bfloat16/float16 F.linear with a vectorised GEMV that
accumulates in float32 and reads half the bytes of a float32 weight, so a
single-stream decode step (which reads every weight once) gets faster. A
half-precision GEMM of more rows runs on oneDNN only where the CPU computes
bf16/fp16 natively (AVX512-BF16, AMX); elsewhere (AVX2) torch falls back to a
scalar loop, several times slower than float32. There the weight is widened to
float32 a block of rows at a time and multiplied with float32's GEMM: the same
float32 accumulation and one rounding of the output.

The block size depends on how many rows share it. With a few rows (decode) each
widened value is used a few times only, so a small block that stays in cache
between being widened and being read is best. With many rows (prefill) every
GEMM call packs the whole input again, so one call per weight (up to a cap on
the temporary copy) is faster: on SmolLM2's matrices at 1,024 rows, 2 MiB blocks took 15-25% longer
than whole-matrix ones, while at 8-32 rows 2 MiB blocks were as fast or faster.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

__all__ = ["fast_cpu_bfloat16", "linear", "native_half_gemm"]

FEW_ROWS_BLOCK_ELEMENTS = 1 << 19  # 2 MiB of float32 weight per block: stays in cache for the GEMM
MANY_ROWS_BLOCK_ELEMENTS = 1 << 23  # 32 MiB: every layer matrix of a small model in one block, LM heads in a few
MANY_ROWS = 64  # from here on one call per matrix wins (measured crossover on SmolLM2's matrices: 32-128 rows)


@functools.cache  # the CPU does not change: asked once per dtype, not on every linear call
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's CPU GEMM computes `dtype` in hardware (oneDNN on AVX512-BF16 or AMX) on this machine."""
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return True


def fast_cpu_bfloat16() -> str | None:
    """Why bfloat16 is fast on this CPU (torch's vectorised kernels, or a native GEMM), or None where it runs scalar.

    torch.backends.cpu reports which of torch's vectorised kernel builds this CPU
    dispatches to; the bfloat16 GEMV and the float32 widening above use them. Only
    x86 is claimed: other vector builds (ARM SVE/NEON) were not measured.
    """
    if native_half_gemm(torch.bfloat16):
        return "the CPU computes bfloat16 GEMMs natively (AVX512-BF16 or AMX)"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        return f"torch's {capability} kernels vectorise the bfloat16 GEMV"
    return None


def widened_block_rows(rows: int, in_features: int) -> int:
    """How many weight rows to widen at a time for a GEMM of `rows` input rows (see the module docstring)."""
    elements = MANY_ROWS_BLOCK_ELEMENTS if rows >= MANY_ROWS else FEW_ROWS_BLOCK_ELEMENTS
    return max(1, elements // in_features)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), except that a CPU half-precision GEMM torch would run as a scalar loop is widened."""
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows <= 1 or weight.dtype == torch.float32 or native_half_gemm(weight.dtype):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1]).float()
    out = torch.empty(rows, weight.shape[0], dtype=torch.float32, device=x.device)
    block = widened_block_rows(rows, weight.shape[1])
    for start in range(0, weight.shape[0], block):
        torch.mm(flat, weight[start : start + block].float().t(), out=out[:, start : start + block])
    if bias is not None:
        out += bias
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
