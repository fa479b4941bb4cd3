"""Linear layers that hold one tensor-parallel rank's slice of a weight.

Column-parallel layers split the output features (no communication: each rank
produces its own heads / MLP columns); row-parallel layers split the input
features and all-reduce the partial sums. With tp_size == 1 every forward is a
single F.linear, exactly as fast as nn.Linear. Fused layers (QKV, gate/up) keep
the checkpoint's separate tensors as shards of one parameter, named by shard_id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.tensor_parallel import all_reduce, divide, tp_rank_and_size
from engine.layers.weights import check_shape


class _ParallelLinear(nn.Module):
    """This rank's (uninitialised) weight and bias; subclasses decide how checkpoint tensors are sliced."""

    def __init__(
        self,
        local_in: int,
        local_out: int,
        bias: bool,
        tp_rank: int,
        tp_size: int,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(local_out, local_in), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


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
        super().__init__(input_size, divide(output_size, size), bias, rank, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        check_shape(loaded, (rows * self.tp_size, *param.shape[1:]))
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))


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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int), "gate_up shards are numbered"
        check_shape(loaded, (self.output_sizes[shard_id], *param.shape[1:]))
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        rows = self.output_sizes[shard_id] // self.tp_size
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, self.tp_rank * rows, rows))


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

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id == "q":
            total_heads, offset, rows = self.total_num_heads, 0, self.q_size
            first_head = self.tp_rank * self.num_heads
        elif shard_id in ("k", "v"):
            total_heads, rows = self.total_num_kv_heads, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            first_head = self.tp_rank * self.total_num_kv_heads // self.tp_size
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        check_shape(loaded, (total_heads * self.head_dim, *param.shape[1:]))
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, first_head * self.head_dim, rows))


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
        super().__init__(divide(input_size, size), output_size, bias, rank, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if param.dim() == 1:  # bias: replicated
            check_shape(loaded, tuple(param.shape))
            param.data.copy_(loaded[...])
            return
        cols = param.shape[1]
        check_shape(loaded, (param.shape[0], cols * self.tp_size))
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y) if self.tp_size > 1 else y
