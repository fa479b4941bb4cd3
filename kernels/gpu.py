"""Facts about the CUDA device a launch runs on, looked up once per device."""

from __future__ import annotations

import functools

import torch


def device_index(device: torch.device) -> int:
    """The index of a CUDA device; a bare "cuda" means the current one."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def capability(index: int) -> tuple[int, int]:
    """Compute capability (major, minor) of CUDA device `index`."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def multiprocessor_count(index: int) -> int:
    """Streaming multiprocessors (SMs) of CUDA device `index`."""
    return torch.cuda.get_device_properties(index).multi_processor_count
