"""The `--kv-cache-dtype` values (vLLM's names) and the per-layer K/V scales an FP8 cache is read with.

An FP8 cache stores K / k_scale and V / v_scale as float8_e4m3fn (clamped to
its +-448 range) and the attention kernels multiply them back. The scales are
one float32 per layer for K and one for V, 1.0 unless the checkpoint carries
calibrated ones (vLLM's convention, and its tensor names):

- `...self_attn.k_scale` / `.v_scale` (llm-compressor `kv_cache_scheme`, current vLLM FP8 checkpoints);
- `...self_attn.k_proj.output_scale` / `v_proj.output_scale` (older compressed-tensors checkpoints);
- `...self_attn.k_proj.k_scale` / `v_proj.v_scale` (NVIDIA ModelOpt);
- `...self_attn.kv_scale` (the deprecated single scale, used for both).

Per-head scales ([num_kv_heads]) are reduced to their maximum: the one
per-tensor scale that keeps every head in range. With `--kv-cache-dtype auto`
the cache has the model's dtype and the scales are loaded but never used.
"""

from __future__ import annotations

import math

import torch

from engine.errors import ConfigError, ModelLoadError
from kernels.reference import FP8_DTYPE

KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8", "fp8_e4m3")

# Checkpoint name suffix (after "self_attn.") -> the Attention module buffers it fills.
_SCALE_SUFFIXES: dict[str, tuple[str, ...]] = {
    "k_scale": ("k_scale",),
    "v_scale": ("v_scale",),
    "kv_scale": ("k_scale", "v_scale"),
    "k_proj.output_scale": ("k_scale",),
    "v_proj.output_scale": ("v_scale",),
    "k_proj.k_scale": ("k_scale",),
    "v_proj.v_scale": ("v_scale",),
}


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache is allocated in: the model's for "auto", float8_e4m3fn for fp8 / fp8_e4m3."""
    check_kv_cache_dtype(kv_cache_dtype)
    return model_dtype if kv_cache_dtype == "auto" else FP8_DTYPE


def kv_scale_buffers(checkpoint_name: str) -> list[str] | None:
    """The Attention buffers (full names) a checkpoint KV-scale tensor fills; None if it is not one."""
    prefix, found, suffix = checkpoint_name.rpartition(".self_attn.")
    if not found or suffix not in _SCALE_SUFFIXES:
        return None
    return [f"{prefix}.self_attn.attn.{buffer}" for buffer in _SCALE_SUFFIXES[suffix]]


def checked_kv_scale(tensor: torch.Tensor, checkpoint_name: str, source: str) -> float:
    """The per-tensor scale of a checkpoint KV-scale tensor (a scalar, or per-head values reduced to their max)."""
    values = tensor.float().flatten()
    scale = float(values.max()) if values.numel() else math.nan
    if not (math.isfinite(scale) and bool((values > 0).all())):
        raise ModelLoadError(f"{source}: KV-cache scale {checkpoint_name} must be finite and positive, "
                             f"got {values.tolist()[:8]}")
    return scale
