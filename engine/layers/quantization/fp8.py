"""FP8 (e4m3) linear layers: FP8 checkpoints, and bf16/fp16 checkpoints quantized while they load.

Checkpoint layouts read here:
  - `quant_method: fp8` (AutoFP8 / llm-compressor's fp8 export): `weight` fp8 [N, K],
    `weight_scale` one value per tensor, `input_scale` one value per tensor when
    `activation_scheme` is static;
  - compressed-tensors `float-quantized`: the same names, with `weight_scale` [N, 1]
    per output channel (strategy channel) or one value (strategy tensor).
Fused layers (qkv, gate_up) get one scale per part: every layout becomes one
float32 scale per output row, which is what the kernel reads. Static input
scales of the parts are reduced to their maximum (each part's activation is
the same tensor, so the largest scale is safe for all).

With dynamic per-token activation scales a layer also takes its input already
quantized (an Fp8Activation from the fused RMSNorm or SiLU-and-mul before it:
apply_fp8), which skips the separate quantization launch.

Online quantization (`--quantization fp8` on a 16-bit checkpoint) quantizes each
checkpoint tensor slice as it is copied in, per output row, so neither host nor
device ever holds a 16-bit copy of a layer's weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from engine.layers.quantization.base import PER_SHARD, VECTOR, DENSE, LinearMethod, add_param, replace_param
from engine.layers.quantization.fp8_activation import Fp8Activation
from kernels import quant_reference


@dataclass(frozen=True)
class Fp8Scheme:
    serialized: bool  # the checkpoint holds fp8 weights (False: quantize 16-bit weights at load)
    per_channel_weight_scale: bool  # checkpoint weight_scale is [N, 1] (else one value per part)
    static_activation: bool  # the checkpoint holds input_scale (else scales per token at run time)


class Fp8LinearMethod(LinearMethod):
    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, full_input_size: int) -> None:
        add_param(layer, "weight", (output_size, input_size), quant_reference.FP8_DTYPE, DENSE)
        if not self.scheme.serialized:
            layer.register_buffer("weight_scale", torch.empty(output_size, dtype=torch.float32))
            layer.weight.store = _quantizing_store(layer)
            return
        if self.scheme.per_channel_weight_scale:
            add_param(layer, "weight_scale", (output_size, 1), torch.float32, VECTOR)
        else:
            add_param(layer, "weight_scale", (output_size,), torch.float32, PER_SHARD)
        if self.scheme.static_activation:
            add_param(layer, "input_scale", (output_size,), torch.float32, PER_SHARD)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not self.scheme.serialized:
            return
        replace_param(layer, "weight_scale", layer.weight_scale.data.reshape(-1).float().contiguous())
        if self.scheme.static_activation:
            replace_param(layer, "input_scale", layer.input_scale.data.max().reshape(1))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        backend = kernels if x.is_cuda else quant_reference
        x2 = x.reshape(-1, x.shape[-1])
        if self.scheme.static_activation:
            y = backend.fp8_static_linear(x2, layer.input_scale, layer.weight, layer.weight_scale, bias)
        else:
            y = backend.fp8_linear(x2, layer.weight, layer.weight_scale, bias)
        return y.reshape(*x.shape[:-1], -1)

    def takes_fp8_activation(self) -> bool:
        return not self.scheme.static_activation  # a static scale is the checkpoint's, not the producer's to pick

    def apply_fp8(self, layer: nn.Module, x: Fp8Activation, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.takes_fp8_activation():
            return super().apply_fp8(layer, x, bias)
        backend = kernels if x.values.is_cuda else quant_reference
        return backend.fp8_matmul(x.values, x.scale, layer.weight, layer.weight_scale, x.dtype, bias)


def _quantizing_store(layer: nn.Module):
    """The weight's store: quantize a 16-bit checkpoint slice per row into the fp8 weight and its scales."""

    def store(rows: slice, tensor: torch.Tensor) -> None:
        device = layer.weight.device
        quantized, scale = quant_reference.quantize_fp8_per_channel(tensor.to(device))
        layer.weight.data[rows].copy_(quantized)
        layer.weight_scale[rows].copy_(scale)

    return store
