"""The gated MLP's activation on the fused gate/up projection: SwiGLU (silu) or GeGLU (tanh-approximated gelu)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class SiluAndMul(nn.Module):
    """[..., 2 * d] (gate, up) -> silu(gate) * up: [..., d]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one Triton launch instead of two kernels and an intermediate
            return kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """[..., 2 * d] (gate, up) -> gelu_tanh(gate) * up: [..., d] (Gemma's gelu_pytorch_tanh)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


# config.json's hidden_act / hidden_activation -> the gated activation
GATED_ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": SiluAndMul, "gelu_pytorch_tanh": GeluTanhAndMul}
