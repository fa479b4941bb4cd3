"""How one checkpoint tensor lands in one (possibly sharded or fused) parameter.

Every parameter gets a `weight_loader(param, loaded, shard_id=None)`; the model
loader calls it once per checkpoint tensor. Loaders check the FULL checkpoint
shape before slicing, so a wrong checkpoint fails with both shapes named
instead of silently loading a slice of it.

`loaded` is a tensor or a CheckpointSlice (what the model loader passes): both
have `.shape`, `.narrow()` and indexing, and loaders read only through those
(`loaded[...]` for the whole tensor), so a tensor-parallel rank reads just its
shard from disk.
"""

from __future__ import annotations

from typing import Any

import torch


class ShapeMismatchError(ValueError):
    """A checkpoint tensor does not have the shape the model expects."""

    def __init__(self, expected: tuple[int, ...], got: tuple[int, ...]):
        super().__init__(f"expected shape {list(expected)}, got {list(got)}")
        self.expected = expected
        self.got = got


class CheckpointSlice:
    """A safetensors tensor not read yet: narrowing or indexing reads only the part asked for."""

    def __init__(self, lazy_slice: Any):  # safetensors' safe_open(...).get_slice(name)
        self._slice = lazy_slice
        self.shape = torch.Size(lazy_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not 0 <= start <= start + length <= self.shape[dim]:  # slicing would silently read less
            raise IndexError(f"rows {start}..{start + length} are outside dimension {dim} of size {self.shape[dim]}")
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._slice[index]


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ShapeMismatchError(tuple(expected), tuple(loaded.shape))


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """Replicated parameters (norms, unsharded biases): the whole tensor, cast to the parameter's dtype."""
    check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded[...])
