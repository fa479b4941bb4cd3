"""Linear layers that hold one tensor-parallel rank's slice of a weight.

Column-parallel layers split the output features (no communication: each rank
produces its own heads / MLP columns); row-parallel layers split the input
features and all-reduce the partial sums. With tp_size == 1 every forward is a
single F.linear, exactly as fast as nn.Linear. Fused layers (QKV, gate/up) keep
the checkpoint's separate tensors as shards of one parameter, named by shard_id.
Each layer says which output rows a shard is (`output_rows`) and whether it
splits its input; the one weight_loader slices any parameter, dense or
quantized, from that and the parameter's ParamLayout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.quantization import current_linear_method
from engine.layers.quantization.base import DENSE, VECTOR, ParamLayout, add_param
from engine.layers.quantization.fp8_activation import Fp8Activation, LinearInput
from engine.layers.tensor_parallel import all_reduce, divide, tp_rank_and_size
from engine.layers.weights import ShapeMismatchError, check_shape


@dataclass(frozen=True)
class OutputRows:
    """Which output features of one checkpoint tensor (of `total`) this rank reads, and where they go."""

    src: int
    dst: int
    length: int
    total: int


class _ParallelLinear(nn.Module):
    """This rank's (uninitialised) weight and bias; subclasses decide how checkpoint tensors are sliced.

    The weight's parameters come from the quantization method in scope at
    construction (dense by default); every parameter is sliced by one loader
    that reads its ParamLayout, so quantized formats shard like dense weights.
    """

    def __init__(
        self,
        local_in: int,
        local_out: int,
        bias: bool,
        tp_rank: int,
        tp_size: int,
        full_in: int | None = None,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.quant_method = current_linear_method()
        self.quant_method.create_weights(self, local_in, local_out, full_in or local_in)
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader
        if bias:
            add_param(self, "bias", (local_out,), torch.get_default_dtype(), VECTOR)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def output_rows(self, shard_id: object) -> OutputRows:
        raise NotImplementedError

    def input_sharded(self) -> bool:
        return False

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        layout: ParamLayout = getattr(param, "shard_layout", DENSE)
        rows = self.output_rows(shard_id)
        if layout.per_shard:
            if math.prod(loaded.shape) != 1:
                raise ShapeMismatchError((1,), tuple(loaded.shape))
            param.data.narrow(0, rows.dst, rows.length).fill_(loaded[...].reshape(()).item())
            return
        expected = list(param.shape)
        if layout.output_dim is not None:
            expected[layout.output_dim] = _packed(rows.total, layout.output_pack)
        split_input = layout.input_dim is not None and self.input_sharded()
        if split_input:
            expected[layout.input_dim] = param.shape[layout.input_dim] * self.tp_size
        check_shape(loaded, tuple(expected))
        tensor, target = loaded, param.data
        if layout.output_dim is not None:
            dim, pack = layout.output_dim, layout.output_pack
            length = _packed(rows.length, pack)
            target = target.narrow(dim, _packed(rows.dst, pack), length)
            if rows.length != rows.total:  # else one read of the whole tensor (or of its input shard)
                tensor = tensor.narrow(dim, _packed(rows.src, pack), length)
        if split_input:
            cols = param.shape[layout.input_dim]
            tensor = tensor.narrow(layout.input_dim, self.tp_rank * cols, cols)
        if not isinstance(tensor, torch.Tensor):
            tensor = tensor[...]
        store = getattr(param, "store", None)
        if store is not None:
            store(slice(rows.dst, rows.dst + rows.length), tensor)
        else:
            target.copy_(tensor)

    @property
    def takes_fp8_activation(self) -> bool:
        """Whether forward also takes an Fp8Activation: the layer before may then quantize its output for it."""
        return self.quant_method.takes_fp8_activation()

    def matmul(self, x: LinearInput, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, Fp8Activation):
            return self.quant_method.apply_fp8(self, x, bias)
        return self.quant_method.apply(self, x, bias)

    def forward(self, x: LinearInput) -> torch.Tensor:
        return self.matmul(x, self.bias)


def _packed(features: int, pack: int) -> int:
    """Features -> elements along a packed axis; a shard must not split one element."""
    if features % pack:
        raise ValueError(f"{features} features do not split into whole packs of {pack} in a tensor-parallel shard")
    return features // pack


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T with W's rows (output features) split across ranks; outputs stay sharded."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        rank, size = tp_rank_and_size(tp_rank, tp_size)
        self.output_size = output_size
        super().__init__(input_size, divide(output_size, size), bias, rank, size)

    def output_rows(self, shard_id: object) -> OutputRows:
        rows = self.output_size // self.tp_size
        return OutputRows(src=self.tp_rank * rows, dst=0, length=rows, total=self.output_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_proj + up_proj).

    shard_id is the index of the checkpoint tensor in output_sizes.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def output_rows(self, shard_id: object) -> OutputRows:
        assert isinstance(shard_id, int), "gate_up shards are numbered"
        rows = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return OutputRows(src=self.tp_rank * rows, dst=offset, length=rows, total=self.output_sizes[shard_id])


class QKVParallelLinear(_ParallelLinear):
    """Fused q/k/v projection; each rank holds its query heads and the KV heads they attend to.

    With fewer KV heads than ranks, KV heads are replicated: rank r holds KV head
    r * num_kv_heads // tp_size, which is the head its query heads are grouped with.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        rank, size = tp_rank_and_size(tp_rank, tp_size)
        if num_kv_heads < size and size % num_kv_heads:
            raise ValueError(f"tensor-parallel size {size} must be a multiple of num_kv_heads {num_kv_heads}")
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, size)
        self.num_kv_heads = max(1, num_kv_heads // size)
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, local_out, bias, rank, size)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def output_rows(self, shard_id: object) -> OutputRows:
        if shard_id == "q":
            total_heads, offset, rows = self.total_num_heads, 0, self.q_size
            first_head = self.tp_rank * self.num_heads
        elif shard_id in ("k", "v"):
            total_heads, rows = self.total_num_kv_heads, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            first_head = self.tp_rank * self.total_num_kv_heads // self.tp_size
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return OutputRows(src=first_head * self.head_dim, dst=offset, length=rows, total=total_heads * self.head_dim)


class RowParallelLinear(_ParallelLinear):
    """y = x W^T with W's columns (input features) split; partial sums are all-reduced.

    The bias is added by rank 0 only, so the all-reduce adds it exactly once.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        rank, size = tp_rank_and_size(tp_rank, tp_size)
        self.output_size = output_size
        super().__init__(divide(input_size, size), output_size, bias, rank, size, full_in=input_size)

    def output_rows(self, shard_id: object) -> OutputRows:
        return OutputRows(src=0, dst=0, length=self.output_size, total=self.output_size)

    def input_sharded(self) -> bool:
        return True

    def forward(self, x: LinearInput) -> torch.Tensor:
        y = self.matmul(x, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y) if self.tp_size > 1 else y
