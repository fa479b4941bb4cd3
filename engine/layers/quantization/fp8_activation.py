"""A linear layer's input already quantized to FP8 per token, by the RMSNorm or SiLU-and-mul before it.

With dynamic per-token activation scales, every FP8 linear quantizes its
input before the GEMM. Where that input comes straight from a fused norm or
activation kernel, the kernel quantizes it in the same launch and hands the
layer this instead of a 16-bit tensor (kernels/fused.py's `_fp8` variants).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels


@dataclass(frozen=True)
class Fp8Activation:
    """values: float8_e4m3fn [M, K]; scale: float32 [M, 1], one per token; dtype: the activation dtype.

    The values are what quantizing the 16-bit activation per token gives; dtype
    is that activation's dtype, which the linear layer's output keeps.
    """

    values: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


# What a linear layer takes: a 16-bit activation, or (FP8 layers with per-token scales only) its quantized form.
LinearInput = torch.Tensor | Fp8Activation


def quantized_by_producer(fp8_output: bool, x: torch.Tensor) -> bool:
    """Whether a fused norm or activation built with fp8_output quantizes its (CUDA) output of x: where the FP8
    linear after it would quantize it (not one 16-bit row: kernels.fp8_quantizes_activations)."""
    return fp8_output and kernels.fp8_quantizes_activations(x.numel() // x.shape[-1], x.dtype)
