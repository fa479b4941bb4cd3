"""Triton kernel that writes a step's new K/V into the paged cache.

Same signature and semantics as kernels.reference.store_kvcache: token t goes
to flat slot slot_mapping[t] (block = slot // block_size, offset = slot %
block_size); a negative slot is padding (e.g. a CUDA-graph batch slot) and is
skipped, with no host sync to filter it out. An FP8 cache gets K / k_scale and
V / v_scale, clamped to +-448 and rounded to float8_e4m3fn in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.pdl import launch_options, wait_for_previous
from kernels.reference import FP8_DTYPE, FP8_MAX


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_block, stride_cache_slot, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HD: tl.constexpr, FP8: tl.constexpr, FP8_MAX: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    # One program moves all heads of one token: [num_kv_heads * head_dim] contiguous per head.
    offs = tl.arange(0, BLOCK_HD)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    mask = offs < NUM_KV_HEADS * HEAD_DIM
    cache_offs = block * stride_cache_block + offset * stride_cache_slot + head * stride_cache_head + dim
    k = tl.load(key_ptr + token * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + head * stride_vh + dim, mask=mask)
    if FP8:
        k = tl.clamp(k.to(tl.float32) / tl.load(k_scale_ptr), -FP8_MAX, FP8_MAX)
        v = tl.clamp(v.to(tl.float32) / tl.load(v_scale_ptr), -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int; negative slots are skipped
    k_scale: torch.Tensor | None = None,  # one float32 each; used when the cache is FP8 (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter this step's K/V into their cache slots (one program per token)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("store_kvcache needs the head dimension contiguous")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout")
    fp8 = k_cache.dtype == FP8_DTYPE
    k_scale, v_scale = kv_scales(k_scale, v_scale, fp8, key)
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HD=triton.next_power_of_2(num_kv_heads * head_dim), FP8=fp8, FP8_MAX=FP8_MAX,
        **launch_options(key.device),
    )


def kv_scales(
    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, fp8: bool, placeholder: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 scale tensors a kernel reads (1.0 where not given); `placeholder` when the cache is not FP8."""
    if not fp8:
        return placeholder, placeholder

    def as_float32(scale: torch.Tensor | None) -> torch.Tensor:
        return torch.ones(1, dtype=torch.float32, device=placeholder.device) if scale is None else scale.float()

    return as_float32(k_scale), as_float32(v_scale)
