"""Write a safetensors file tensor by tensor, so a 141 GB checkpoint never sits in host memory.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length, a JSON header mapping each name to dtype, shape and byte
offsets, then the raw little-endian tensor bytes in header order. Offsets are
known from shapes alone, so the header is written first and each tensor is
produced, written and dropped in turn.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from pathlib import Path

import torch

_DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    make_tensor: Callable[[str], torch.Tensor],
) -> int:
    """Write shapes' tensors (in dict order) produced by make_tensor(name); returns the data size in bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    item_size = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        nbytes = item_size * math.prod(shape)
        header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header_bytes)))
        out.write(header_bytes)
        for name, shape in shapes.items():
            tensor = make_tensor(name).to(dtype).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: made shape {tuple(tensor.shape)}, header says {shape}")
            out.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return offset

