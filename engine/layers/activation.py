"""The gated MLP's activation on the fused gate/up projection: SwiGLU (silu) or GeGLU (tanh-approximated gelu)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.layers.quantization.fp8_activation import Fp8Activation, LinearInput, quantized_by_producer


class GatedActivation(nn.Module):
    """[..., 2 * d] (gate, up) -> act(gate) * up: [..., d].

    fp8_output: the down projection takes FP8 activations quantized per token
    (LinearMethod.takes_fp8_activation); on CUDA an activation with a fused
    kernel then quantizes its output in the same launch and returns an
    Fp8Activation, except where the linear would not quantize it (one 16-bit
    row: kernels.fp8_quantizes_activations). Elsewhere it returns the tensor,
    which the layer quantizes itself to the same values.
    """

    fused_on_cuda = False  # whether a Triton kernel computes it on CUDA (and can quantize its output)

    def __init__(self, fp8_output: bool = False):
        super().__init__()
        if fp8_output and not self.fused_on_cuda:
            raise ValueError(f"{type(self).__name__} has no fused kernel to quantize its output in")
        self.fp8_output = fp8_output


class SiluAndMul(GatedActivation):
    fused_on_cuda = True

    def forward(self, x: torch.Tensor) -> LinearInput:
        if x.is_cuda:  # one Triton launch instead of two kernels and an intermediate (and the quantization's)
            if quantized_by_producer(self.fp8_output, x):
                values, scale = kernels.silu_and_mul_fp8(x)
                return Fp8Activation(values, scale, x.dtype)
            return kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(GatedActivation):
    """Gemma's gelu_pytorch_tanh."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


# config.json's hidden_act / hidden_activation -> the gated activation
GATED_ACTIVATIONS: dict[str, type[GatedActivation]] = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}
