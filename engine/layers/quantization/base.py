"""What a quantization method is to a linear layer, and how its checkpoint tensors are sharded.

A LinearMethod creates a layer's parameters in the checkpoint's own layout
(so the loader can copy each tensor, or each tensor-parallel slice of it,
straight in), converts them once after loading to the layout its kernel reads
(`process_weights_after_loading`), and runs the matmul (`apply`).

Each parameter carries a ParamLayout that tells the parallel linear layers
which of its axes runs over output features and which over input features,
and how many features one element covers along each (8 for int4 values packed
into an int32, the group size for group scales). That is all the layers need
to slice any format for tensor parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.quantization.fp8_activation import Fp8Activation
from kernels import cpu_linear


@dataclass(frozen=True)
class ParamLayout:
    """How a checkpoint tensor's axes map onto the layer's output and input features.

    output_dim / input_dim: the axis over output / input features, None when the
    tensor does not run over them (then it is not split along them: a per-channel
    scale is the same on every input shard). per_shard: the tensor is one value for
    its whole fused part (a per-tensor FP8 scale), written into that part's rows.
    """

    output_dim: int | None = 0
    input_dim: int | None = 1
    output_pack: int = 1
    input_pack: int = 1
    per_shard: bool = False


DENSE = ParamLayout()  # nn.Linear's [out, in]
VECTOR = ParamLayout(output_dim=0, input_dim=None)  # a bias, or one value per output row
PER_SHARD = ParamLayout(output_dim=0, input_dim=None, per_shard=True)

# A parameter may carry `store(rows, tensor)`: the loader then hands it the loaded slice (for the output
# rows `rows`) instead of copying it in, so the method can convert it (online FP8 quantizes it).


def add_param(layer: nn.Module, name: str, shape: tuple[int, ...], dtype: torch.dtype, layout: ParamLayout) -> None:
    """An uninitialised, frozen parameter on the current default device, with its layout."""
    param = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    param.shard_layout = layout
    layer.register_parameter(name, param)


class LinearMethod:
    """How one linear layer stores and applies its weight; the default is plain dense F.linear."""

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, full_input_size: int) -> None:
        """Register the layer's weight parameter(s) for its local [output_size, input_size] slice.

        full_input_size is the whole layer's input (larger than input_size on row-parallel ranks).
        """
        add_param(layer, "weight", (output_size, input_size), torch.get_default_dtype(), DENSE)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded checkpoint tensors into what apply() reads (nothing for dense weights)."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return cpu_linear.linear(x, layer.weight, bias)

    def takes_fp8_activation(self) -> bool:
        """Whether apply_fp8 runs: the input is quantized per token anyway, so its producer may do it instead."""
        return False

    def apply_fp8(self, layer: nn.Module, x: Fp8Activation, bias: torch.Tensor | None) -> torch.Tensor:
        """The matmul on an input already quantized per token (methods whose takes_fp8_activation is True)."""
        raise TypeError(f"{type(self).__name__} takes 16-bit activations, not FP8 ones quantized per token")


def replace_param(layer: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Swap a parameter for its converted form (None: an absent one), freeing the checkpoint-layout tensor."""
    if name in layer._parameters:
        del layer._parameters[name]
    layer.register_parameter(name, None if value is None else nn.Parameter(value, requires_grad=False))
