"""Fused elementwise Triton kernels for the decoder layer: one launch where torch needs several.

In a CUDA-graph decode step of a small model the GPU time is mostly the
fixed cost of many tiny kernels: RMSNorm in torch is ~8 launches, the rotary
embedding ~10 per tensor, SiLU-and-mul 2. Each function here is one launch and
rounds exactly where the torch code in engine/layers does (Hugging Face's
order), so outputs match it bit for bit or within one rounding of fp32 math.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, residual_out_ptr, weight_ptr, out_ptr, stride_x, stride_r, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # x + residual rounds to the activation dtype first, as the torch add does; it is the next residual.
        x = (x + tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * HIDDEN + offs, x, mask=mask)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / HIDDEN + eps)
    normed = (x32 * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + offs, (weight * normed).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x), or with a residual (norm(x + residual), x + residual), in one pass over the row."""
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    residual2 = residual.reshape(-1, hidden) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, residual2, residual_out, weight, out, x2.stride(0), residual2.stride(0), eps,
            HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), HAS_RESIDUAL=residual is not None,
            num_warps=4 if hidden <= 4096 else 8,
        )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), residual_out.view(x.shape)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, D: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + D + offs, mask=mask, other=0.0).to(tl.float32)
    activated = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (activated * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * d] (gate, up) -> silu(gate) * up: [..., d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(d))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](x2, out, x2.stride(0), D=d, BLOCK=block,
                                                                    num_warps=4)
    return out.view(*x.shape[:-1], d)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_cs,
                   NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
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
            HALF_PAD=triton.next_power_of_2(half), num_warps=4,
        )
    return out
