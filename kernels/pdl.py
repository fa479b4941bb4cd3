"""Programmatic dependent launch (Hopper and newer): a kernel starts while the one before it drains.

A decode step is hundreds of short kernels in a row. Normally each waits, on the GPU, for the
previous one to finish and flush before its first block is even scheduled, and its own loads then
start from nothing. Launched with PDL, a kernel's blocks are scheduled as soon as every block of
the previous kernel has passed `wait_for_previous` (below); they set up their addresses and then
block in `wait_for_previous` until the previous kernel has finished and its writes are visible.

Every kubellm Triton kernel calls `wait_for_previous(PDL)` before it touches memory that an
earlier kernel writes or reads, in every program, before any early exit. That keeps the ordering
of a plain stream: when a kernel passes its wait, the previous kernel is complete, and that one
passed its own wait only after its predecessor was complete. At most two kernels overlap.

KUBELLM_PDL=0 turns it off (benchmarks compare the two in one process); under the Triton
interpreter, on CPUs and on GPUs before Hopper it is off.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.backends.nvidia.compiler import CUDAOptions
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.gpu import capability, device_index
from kernels.interpreter import interpreted

LAUNCHER_SUPPORTS_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched with PDL now."""
    return (device.type == "cuda" and LAUNCHER_SUPPORTS_PDL and not interpreted()
            and os.environ.get("KUBELLM_PDL", "1") != "0"
            and capability(device_index(device)) >= (9, 0))


def launch_options(device: torch.device) -> dict[str, bool]:
    """The keyword arguments a launch on `device` adds: the kernel's PDL flag and Triton's launch option."""
    if not enabled(device):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}


@triton.jit
def wait_for_previous(PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible, then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
