"""RMSNorm, computed in float32 and cast back exactly as Hugging Face Llama (and Gemma) do."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.layers.quantization.fp8_activation import Fp8Activation, LinearInput, quantized_by_producer


class RMSNorm(nn.Module):
    """fp8_output: the next layer is a linear that takes FP8 activations quantized per token
    (LinearMethod.takes_fp8_activation); on CUDA the norm then quantizes its output in the same
    launch and returns an Fp8Activation, except where the linear would not quantize it (one 16-bit
    row: kernels.fp8_quantizes_activations). On CPU it returns the tensor, which the layer quantizes
    itself to the same values.
    """

    fused_on_cuda = True  # the Triton kernel rounds exactly as _norm does

    def __init__(self, hidden_size: int, eps: float = 1e-6, fp8_output: bool = False):
        super().__init__()
        if fp8_output and not self.fused_on_cuda:
            raise ValueError(f"{type(self).__name__} has no fused kernel to quantize its output in")
        self.eps = eps
        self.fp8_output = fp8_output
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # nothing to round: one call instead of four (CPU decode counts calls)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused kernel where torch has it
        return self.weight * normed.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> LinearInput | tuple[LinearInput, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual) — the pre-norm block's add fused in."""
        if x.is_cuda and self.fused_on_cuda:  # one Triton launch instead of ~8 torch kernels, same rounding
            if quantized_by_producer(self.fp8_output, x):
                values, scale, residual_out = kernels.rms_norm_fp8(x, self.weight, self.eps, residual)
                normed = Fp8Activation(values, scale, x.dtype)
                return normed if residual_out is None else (normed, residual_out)
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint stores w - 1, so it scales by (1 + w), and rounds once, after the scaling.

    Computed in torch on every device: the Triton kernel rounds the Llama way.
    """

    fused_on_cuda = False

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)
