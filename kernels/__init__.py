"""Triton kernels (paged attention, fused MoE, fused norm / activation / rotary, quantized GEMMs) and their references.

The Triton kernels are imported lazily (`kernels.paged_decode_attention` etc.),
so CPU-only code that uses kernels.reference never loads Triton or compiles anything.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "store_kvcache": "kernels.cache",
    "paged_decode_attention": "kernels.attention",
    "paged_prefill_attention": "kernels.attention",
    "rms_norm": "kernels.fused",
    "rms_norm_fp8": "kernels.fused",
    "silu_and_mul": "kernels.fused",
    "silu_and_mul_fp8": "kernels.fused",
    "apply_rotary": "kernels.fused",
    "fused_moe": "kernels.moe",
    "w4a16_matmul": "kernels.w4a16",
    "dequantize_w4a16": "kernels.w4a16",
    "quantize_fp8_per_token": "kernels.fp8",
    "fp8_matmul": "kernels.fp8",
    "fp8_linear": "kernels.fp8",
    "fp8_static_linear": "kernels.fp8",
    "fp8_quantizes_activations": "kernels.fp8",
    "fp8_weight_only_gemv": "kernels.fp8_gemv",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
