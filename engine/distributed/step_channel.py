"""Rank 0 sends each step's inputs to every rank without pickling anything.

A message is a command plus a fixed, ordered set of named fields agreed when
the channel is made; each field holds a tensor (any dtype, up to MAX_DIMS
dims), an int, a bool, or None. Sending costs two gloo broadcasts on CPU
tensors at most: one fixed-size message of an int64 header (command, payload
size, and each field's kind, dtype and shape or value) followed by the byte
payload, every tensor's bytes back to back (each padded to 8 bytes), and a
second broadcast with the payload only when it does not fit in the message
(INLINE_BYTES). Receivers rebuild the tensors as views of the payload, in
page-locked memory on GPU workers.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

Field = torch.Tensor | int | bool | None

MAX_DIMS = 4
# Tensor dtypes travel as an index into this tuple.
DTYPES = (
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
)


class Command(enum.IntEnum):
    STEP = 0
    SHUTDOWN = 1


class Kind(enum.IntEnum):
    NONE = 0
    TENSOR = 1
    INT = 2
    BOOL = 3


# Per field: kind, then dtype index (tensors) or value (ints/bools), ndim, dims.
SLOTS_PER_FIELD = 3 + MAX_DIMS
SOURCE_RANK = 0
ALIGNMENT = 8
# Payload bytes that travel in the same broadcast as the header: a decode step of 64 sequences
# with 1k-token block tables fits; a bigger payload follows in a second broadcast.
INLINE_BYTES = 32 * 1024


class StepChannel:
    """Broadcasts {name: field} dicts with a fixed key order from rank 0 over a gloo group."""

    def __init__(self, field_names: Sequence[str], group: dist.ProcessGroup, pin: bool = False):
        """`pin`: receive into page-locked memory, so that the fields copy to a GPU asynchronously."""
        self.field_names = tuple(field_names)
        self.group = group
        self.pin = pin
        self._header_bytes = 8 * (2 + SLOTS_PER_FIELD * len(self.field_names))

    def send(self, command: Command, fields: Mapping[str, Field] | None = None) -> None:
        fields = fields or {}
        unknown = set(fields) - set(self.field_names)
        if unknown:
            raise KeyError(f"fields {sorted(unknown)} are not part of this channel")
        header = [int(command), 0]
        payload = []
        for name in self.field_names:
            slots, data = _encode(name, fields.get(name))
            header += slots
            if data is not None:
                payload.append(data)
        size = header[1] = sum(p.numel() for p in payload)
        message = torch.empty(self._header_bytes + INLINE_BYTES, dtype=torch.uint8)
        message[: self._header_bytes].view(torch.int64).copy_(torch.tensor(header, dtype=torch.int64))
        if payload and size <= INLINE_BYTES:
            torch.cat(payload, out=message[self._header_bytes : self._header_bytes + size])
        dist.broadcast(message, SOURCE_RANK, group=self.group)
        if size > INLINE_BYTES:
            dist.broadcast(torch.cat(payload), SOURCE_RANK, group=self.group)

    def receive(self) -> tuple[Command, dict[str, Field]]:
        # From torch's caching host allocator: a block is reused only once its copies have ended.
        message = torch.empty(self._header_bytes + INLINE_BYTES, dtype=torch.uint8, pin_memory=self.pin)
        dist.broadcast(message, SOURCE_RANK, group=self.group)
        header = message[: self._header_bytes].view(torch.int64).tolist()
        size = header[1]
        if size <= INLINE_BYTES:
            payload = message[self._header_bytes : self._header_bytes + size]
        else:
            payload = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            dist.broadcast(payload, SOURCE_RANK, group=self.group)
        fields: dict[str, Field] = {}
        offset = 0
        for i, name in enumerate(self.field_names):
            slots = header[2 + i * SLOTS_PER_FIELD : 2 + (i + 1) * SLOTS_PER_FIELD]
            fields[name], offset = _decode(slots, payload, offset)
        return Command(header[0]), fields


def _encode(name: str, value: Field) -> tuple[list[int], torch.Tensor | None]:
    slots = [0] * SLOTS_PER_FIELD
    if value is None:
        return slots, None
    if isinstance(value, bool):
        slots[:2] = [Kind.BOOL, int(value)]
        return slots, None
    if isinstance(value, int):
        slots[:2] = [Kind.INT, value]
        return slots, None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"field {name!r} must be a tensor, int, bool or None, got {type(value).__name__}")
    if value.dtype not in DTYPES or value.dim() > MAX_DIMS:
        raise TypeError(f"field {name!r}: {value.dtype} tensors of {value.dim()} dims cannot be sent")
    slots[:3] = [Kind.TENSOR, DTYPES.index(value.dtype), value.dim()]
    slots[3 : 3 + value.dim()] = value.shape
    if value.numel() == 0:  # (an empty tensor's strides may not allow the byte view below)
        return slots, torch.empty(0, dtype=torch.uint8)
    data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return slots, torch.nn.functional.pad(data, (0, _aligned(data.numel()) - data.numel()))


def _decode(slots: list[int], payload: torch.Tensor, offset: int) -> tuple[Field, int]:
    kind = Kind(slots[0])
    if kind is Kind.NONE:
        return None, offset
    if kind is Kind.BOOL:
        return bool(slots[1]), offset
    if kind is Kind.INT:
        return slots[1], offset
    dtype = DTYPES[slots[1]]
    shape = slots[3 : 3 + slots[2]]
    nbytes = math.prod(shape) * dtype.itemsize
    tensor = payload[offset : offset + nbytes].view(dtype).reshape(shape)
    return tensor, offset + _aligned(nbytes)


def _aligned(nbytes: int) -> int:
    """Each tensor starts on an 8-byte boundary of the payload, so it can be viewed as any dtype."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT
