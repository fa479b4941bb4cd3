"""FP8 (e4m3) GEMM with activations quantized per token at run time.

y = (x_q * x_scale) @ (w_q * w_scale)^T, x_scale per token (or one static
scale), w_scale per output channel (kernels/quant_reference.py has the layout).

On GPUs with FP8 tensor cores (compute capability 8.9+: Ada, Hopper) the
matmul is torch._scaled_mm (cuBLASLt) whenever its shape and dtype rules hold;
otherwise, and under the Triton interpreter, a Triton kernel computes the same
thing. Per-token quantization of the activation is one Triton pass (amax and
scaled cast in one read of the row).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.quant_reference import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE

SCALED_MM_ALIGNMENT = 16  # cuBLASLt FP8: K and N multiples of 16
MIN_DOT = 16


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, still float32.

    Rounding here makes the final cast exact, so it cannot depend on how the
    cast rounds: Triton's interpreter truncates carries (124.3 -> 64 instead of 128).
    Ties go to even, as torch's cast does (half-precision inputs tie often).
    """
    magnitude = tl.abs(v)
    exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(magnitude, 1e-30))), -6.0)  # e4m3 subnormals below 2^-6
    ulp = tl.exp2(exponent - 3.0)  # 3 mantissa bits
    steps = magnitude / ulp  # exact: ulp is a power of two
    nearest = tl.floor(steps + 0.5)
    odd = nearest - 2.0 * tl.floor(nearest * 0.5) == 1.0
    nearest = tl.where((nearest - steps == 0.5) & odd, nearest - 1.0, nearest)
    rounded = nearest * ulp
    return tl.where(v < 0, -rounded, rounded)


@triton.jit
def _quantize_per_token_kernel(x_ptr, out_ptr, scale_ptr, stride_x, K, FP8_MAX_VALUE: tl.constexpr,
                               MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX_VALUE, MIN_SCALE)
    tl.store(scale_ptr + row, scale)
    for start in range(0, K, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.clamp(x / scale, -FP8_MAX_VALUE, FP8_MAX_VALUE))
        tl.store(out_ptr + row * K + offs, q.to(out_ptr.dtype.element_ty), mask=offs < K)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3 [M, K], float32 scale [M, 1]); see quant_reference.quantize_fp8_per_token."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = min(1024 if not _interpreted() else 64, triton.next_power_of_2(k))
        _quantize_per_token_kernel[(m,)](x, out, scale, x.stride(0), k, FP8_MAX_VALUE=FP8_MAX,
                                         MIN_SCALE=FP8_MIN_SCALE, BLOCK=block, num_warps=4)
    return out, scale


@triton.jit
def _fp8_matmul_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr, M, N, K,
    A_SCALE_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # b is [N, K] row-major; the tile is read transposed as [BLOCK_K, BLOCK_N].
        b = tl.load(b_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:  # the interpreter and pre-Ada GPUs have no FP8 dot
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if A_SCALE_PER_ROW:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    else:
        a_scale = tl.load(a_scale_ptr)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    acc = acc * a_scale * b_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and _capability(device.index if device.index is not None else 0) >= (8, 9)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _scaled_mm_fits(x_q: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """cuBLASLt's FP8 rules: FP8 tensor cores, K and N multiples of 16, row-wise scales need bf16 output."""
    n, k = weight.shape
    return (
        _has_fp8_tensor_cores(x_q.device)
        and not _interpreted()
        and k % SCALED_MM_ALIGNMENT == 0
        and n % SCALED_MM_ALIGNMENT == 0
        and out_dtype == torch.bfloat16
    )


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_q [M, K] fp8, x_scale float32 [M, 1] (or one value), weight fp8 [N, K], weight_scale float32 [N] -> [M, N]."""
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"FP8 weight {list(weight.shape)} does not match K={k}")
    if _scaled_mm_fits(x_q, weight, out_dtype):
        y = torch._scaled_mm(
            x_q, weight.t(), scale_a=x_scale.float().reshape(-1, 1).expand(m, 1).contiguous(),
            scale_b=weight_scale.float().reshape(1, n), out_dtype=out_dtype,
        )
        return y if bias is None else y.add_(bias)
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m:
        interpreted = _interpreted()
        block_m = MIN_DOT if interpreted or m <= 16 else min(128, triton.next_power_of_2(m))
        block_n, block_k = (32, 32) if interpreted else (128, 128)
        upcast = interpreted or not _has_fp8_tensor_cores(x_q.device)
        _fp8_matmul_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            x_q.contiguous(), x_scale.float().contiguous(), weight.contiguous(), weight_scale.float().contiguous(),
            bias if bias is not None else weight_scale, out, m, n, k,
            A_SCALE_PER_ROW=x_scale.numel() != 1, HAS_BIAS=bias is not None, UPCAST=upcast,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=1 if interpreted else 4, num_stages=1 if interpreted else 3,
        )
    return out
