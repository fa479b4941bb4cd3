"""Quantized linear layers: which method a model's linear layers use, chosen once per model.

`quantization_scope(method)` is entered by the model loader around the
model's construction; every parallel linear layer built inside it asks
`current_linear_method()` for its LinearMethod (dense outside any scope).
What the method is comes from engine.layers.quantization.config, which reads
config.json's `quantization_config` and the `--quantization` flag.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from engine.layers.quantization.base import LinearMethod

_DENSE = LinearMethod()
_current: list[LinearMethod] = [_DENSE]


def current_linear_method() -> LinearMethod:
    return _current[-1]


@contextlib.contextmanager
def quantization_scope(method: LinearMethod | None) -> Iterator[None]:
    """Linear layers built inside use `method` (None: dense)."""
    _current.append(method or _DENSE)
    try:
        yield
    finally:
        _current.pop()
