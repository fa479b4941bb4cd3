"""Fused elementwise Triton kernels for the decoder layer: one launch where torch needs several.

In a CUDA-graph decode step of a small model the GPU time is mostly the
fixed cost of many tiny kernels: RMSNorm in torch is ~8 launches, the rotary
embedding ~10 per tensor, SiLU-and-mul 2. Each function here is one launch and
rounds exactly where the torch code in engine/layers does (Hugging Face's
order), so outputs match it bit for bit or within one rounding of fp32 math.

When the next linear layer takes FP8 activations quantized per token, the
norm and SiLU-and-mul run as their `_fp8` variants: the same row, rounded to
the activation dtype as before, then quantized in the same launch (kernels.fp8's
helpers), so the layer gets e4m3 values and per-row scales with no 16-bit
tensor or separate quantization launch in between.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8 import chunked_row_to_e4m3, row_block_and_warps, row_to_e4m3
from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous
from kernels.quant_reference import FP8_DTYPE


@triton.jit
def _rms_norm_row(x_ptr, residual_ptr, residual_out_ptr, weight_ptr, stride_x, stride_r, eps,
                  HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """This program's row normed and weighted, rounded to the activation dtype (held as float32, 0 past HIDDEN)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # x + residual rounds to the activation dtype first, as the torch add does; it is the next residual.
        x = (x + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)).to(dtype)
        tl.store(residual_out_ptr + row * HIDDEN + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)
    normed = (x32 * inv_rms).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (weight * normed).to(dtype).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, residual_out_ptr, weight_ptr, out_ptr, stride_x, stride_r, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    y = _rms_norm_row(x_ptr, residual_ptr, residual_out_ptr, weight_ptr, stride_x, stride_r, eps, HIDDEN, BLOCK,
                      HAS_RESIDUAL)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + tl.program_id(0) * HIDDEN + offs, y.to(out_ptr.dtype.element_ty), mask=offs < HIDDEN)


@triton.jit
def _rms_norm_fp8_kernel(x_ptr, residual_ptr, residual_out_ptr, weight_ptr, out_ptr, scale_ptr, stride_x, stride_r,
                         eps, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         EXACT_ROUNDING: tl.constexpr, PDL: tl.constexpr):
    """The norm's row (rounded to the activation dtype, as the unfused output is) quantized per token to e4m3."""
    wait_for_previous(PDL)
    y = _rms_norm_row(x_ptr, residual_ptr, residual_out_ptr, weight_ptr, stride_x, stride_r, eps, HIDDEN, BLOCK,
                      HAS_RESIDUAL)
    q, scale = row_to_e4m3(y, EXACT_ROUNDING)
    row = tl.program_id(0)
    tl.store(scale_ptr + row, scale)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * HIDDEN + offs, q, mask=offs < HIDDEN)


def _launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                     out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | None:
    """Run one norm launch over x's rows into out (and scale, when quantizing); returns x + residual, if any."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    residual2 = residual.reshape(-1, hidden) if residual is not None else x2
    residual_out = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    if x2.shape[0]:
        common = dict(HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), HAS_RESIDUAL=residual is not None,
                      num_warps=4 if hidden <= 4096 else 8, **launch_options(x.device))
        args = (x2, residual2, residual_out if residual_out is not None else out, weight, out)
        if scale is None:
            _rms_norm_kernel[(x2.shape[0],)](*args, x2.stride(0), residual2.stride(0), eps, **common)
        else:
            _rms_norm_fp8_kernel[(x2.shape[0],)](*args, scale, x2.stride(0), residual2.stride(0), eps,
                                                 EXACT_ROUNDING=interpreted(), **common)
    return residual_out.view(x.shape) if residual_out is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with a residual (norm(x + residual), x + residual), in one pass over the row."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = _launch_rms_norm(x, weight, eps, residual, out, None)
    return out if residual_out is None else (out, residual_out)


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """norm(x) (or norm(x + residual)) quantized per token for an FP8 linear, in the same one launch.

    Returns (e4m3 [rows, hidden], float32 scale [rows, 1], x + residual or None): exactly
    quantize_fp8_per_token(rms_norm(...)) without the 16-bit output in between.
    """
    rows = x.numel() // x.shape[-1]
    out = torch.empty(rows, x.shape[-1], dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    return out, scale, _launch_rms_norm(x, weight, eps, residual, out, scale)


@triton.jit
def _silu_and_mul_at(x_ptr, offs, D):
    """silu(gate) * up at offsets of one row (gate at x_ptr, up D further), rounded as torch does, as float32."""
    mask = offs < D
    dtype = x_ptr.dtype.element_ty
    gate = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + D + offs, mask=mask, other=0.0).to(tl.float32)
    activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    return (activated * up).to(dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, D: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    y = _silu_and_mul_at(x_ptr + row * stride_x, offs, D)
    tl.store(out_ptr + row * D + offs, y.to(out_ptr.dtype.element_ty), mask=offs < D)


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, out_ptr, scale_ptr, stride_x, D: tl.constexpr, BLOCK: tl.constexpr,
                             EXACT_ROUNDING: tl.constexpr, PDL: tl.constexpr):
    """One row per program (its scale needs the whole row): silu(gate) * up quantized per token to e4m3."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    chunked_row_to_e4m3(x_ptr + row * stride_x, D, out_ptr + row * D, scale_ptr + row, BLOCK, EXACT_ROUNDING,
                        _silu_and_mul_at)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate, up) -> silu(gate) * up: [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), D=d, BLOCK=block,
                                                                    num_warps=4, **launch_options(x.device))
    return out.view(*x.shape[:-1], d)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2 * d] (gate, up) -> silu(gate) * up quantized per token: (e4m3 [rows, d], float32 scale [rows, 1]).

    Exactly quantize_fp8_per_token(silu_and_mul(x)), in one launch and without the 16-bit product.
    """
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    if x2.shape[0]:
        block, num_warps = row_block_and_warps(d)
        _silu_and_mul_fp8_kernel[(x2.shape[0],)](x2, out, scale, x2.stride(0), D=d, BLOCK=block,
                                                 EXACT_ROUNDING=interpreted(), num_warps=num_warps,
                                                 **launch_options(x.device))
    return out, scale


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_cs,
                   NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
                   PDL: tl.constexpr):
    wait_for_previous(PDL)
    token = tl.program_id(0)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    offs = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (offs < HALF)
    dtype = out_ptr.dtype.element_ty
    angles = token * stride_cs + offs
    cos1 = tl.load(cos_ptr + angles, mask=offs < HALF, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + angles + HALF, mask=offs < HALF, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + angles, mask=offs < HALF, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + angles + HALF, mask=offs < HALF, other=0.0).to(tl.float32)
    base = x_ptr + token * stride_xt + heads * stride_xh + offs
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rounding to the model dtype after each op as torch does.
    first = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    second = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    out = out_ptr + (token * NUM_HEADS + heads) * (2 * HALF) + offs  # out is contiguous
    tl.store(out, first.to(dtype), mask=mask)
    tl.store(out + HALF, second.to(dtype), mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on x [T, heads, head_dim] (heads may be strided) with cos/sin [T, 1, head_dim]."""
    num_tokens, num_heads, head_dim = x.shape
    if cos.stride() != sin.stride() or cos.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("apply_rotary needs contiguous head dimensions and cos/sin of one layout")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0),
            NUM_HEADS=num_heads, HALF=half, HEADS_PAD=triton.next_power_of_2(num_heads),
            HALF_PAD=triton.next_power_of_2(half), num_warps=4, **launch_options(x.device),
        )
    return out
