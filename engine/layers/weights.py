"""How one checkpoint tensor lands in one (possibly sharded or fused) parameter.

Every parameter gets a `weight_loader(param, loaded, shard_id=None)`; the model
loader calls it once per checkpoint tensor. Loaders check the FULL checkpoint
shape before slicing, so a wrong checkpoint fails with both shapes named
instead of silently loading a slice of it.
"""

from __future__ import annotations

import torch


class ShapeMismatchError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""

    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...]):
        super().__init__(f"expected shape {list(expected)}, got {list(got)}")
        self.expected = expected
        self.got = got


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ShapeMismatchError(tuple(expected), tuple(loaded.shape))


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Replicated parameters (norms, unsharded biases): the whole tensor, cast to the parameter's dtype."""
    check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)
