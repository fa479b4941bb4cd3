"""Which slice of the model this process holds, and the collectives that join the slices.

Tensor parallelism uses the default torch.distributed process group: one rank
per GPU, all ranks in the group. Without an initialised group everything runs
as rank 0 of 1 and no collective is ever called.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from engine.distributed import small_all_reduce


def tp_rank_and_size(tp_rank: int | None = None, tp_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; otherwise the default process group's, else (0, 1)."""
    if tp_rank is not None and tp_size is not None:
        rank, size = tp_rank, tp_size
    elif dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    else:
        rank, size = 0, 1
    if not 0 <= rank < size:
        raise ValueError(f"tensor-parallel rank {rank} is outside 0..{size - 1}")
    return rank, size


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by tensor-parallel size {denominator}")
    return numerator // denominator


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's `x`: in place through NCCL/gloo, or a new tensor from the
    one-shot kernel for small messages where engine.distributed.small_all_reduce is enabled."""
    small = small_all_reduce.active()
    if small is not None and small.can_reduce(x):
        return small(x)
    dist.all_reduce(x)
    return x


def all_gather_last_dim(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
