"""A one-shot all-reduce over NVLink for the small messages of decode steps (opt-in).

A decode step makes two all-reduces per layer (64 for Llama-3.1-8B) of a few
KB to a few hundred KB each, where NCCL's fixed cost per call dominates. torch's
symmetric memory has a one-shot all-reduce that needs no NVLink multicast: each
rank's input is copied into a buffer every peer has mapped, then one kernel on
each rank reads all peers' buffers directly over NVLink and sums them. It is
captured in CUDA graphs like any kernel.

It serves float32 and bfloat16 messages of up to MAX_BYTES (what torch's kernel
reduces; float16 and larger messages go to NCCL). Every rank must make the same
choice for every call, so the setup is all or nothing: each rank checks that
it can reach every peer's memory and allocates the buffer, the ranks agree,
and if any failed, all use NCCL.

A caveat: the kernel waits for its peers on flags in GPU memory, which NCCL's
abort cannot interrupt, so a rank dying in the middle of a step leaves the
others' kernels spinning until the process exits (shutdown still ends at its
deadline; see parallel_state).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from engine.distributed import parallel_state

logger = logging.getLogger(__name__)

# Messages up to this size take the one-shot path: a decode step of 64 sequences of a
# 4096-wide bfloat16 model sends 512 KiB. Above it, NCCL's ring is as fast or faster.
MAX_BYTES = 512 * 1024
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
REDUCE_SUM = "sum"


class SmallAllReduce:
    """The symmetric buffer of one process group, and the one-shot all-reduce through it."""

    def __init__(self, device: torch.device, dtype: torch.dtype, group: dist.ProcessGroup):
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group.group_name
        self.buffer = symm_mem.empty(MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def can_reduce(self, x: torch.Tensor) -> bool:
        # The kernel moves 4, 8 or 16 bytes per load; the buffer starts aligned.
        nbytes = x.numel() * x.element_size()
        return x.dtype == self.buffer.dtype and x.is_contiguous() and 0 < nbytes <= MAX_BYTES and nbytes % 4 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's `x` (a new tensor; `x` is left as it was)."""
        staging = self.buffer[: x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(staging, x, REDUCE_SUM, self.group_name)

    def release(self) -> None:
        del self.buffer


_active: SmallAllReduce | None = None


def active() -> SmallAllReduce | None:
    """The one-shot all-reduce of this process, if enable() set it up on every rank."""
    return _active


def enable(device: torch.device, dtype: torch.dtype) -> bool:
    """Sets up the one-shot all-reduce on every rank (collective: every rank calls it);
    False, with the reason logged, where any rank cannot, and then every rank uses NCCL."""
    global _active
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    reason = _unsupported_reason(device, dtype, world_size)
    if parallel_state.min_across_ranks(int(reason is None)) == 0:
        if reason is not None:
            logger.warning("small all-reduce: using NCCL on this rank: %s", reason)
        return False
    helper = None
    try:
        helper = SmallAllReduce(device, dtype, dist.group.WORLD)
    except Exception as error:  # noqa: BLE001 - reported, and every rank falls back to NCCL
        logger.warning("small all-reduce: symmetric memory setup failed: %r", error)
    if parallel_state.min_across_ranks(int(helper is not None)) == 0:
        return False
    _active = helper
    parallel_state.release_before_teardown(_release)
    return True


def _unsupported_reason(device: torch.device, dtype: torch.dtype, world_size: int) -> str | None:
    if device.type != "cuda" or world_size < 2:
        return "needs tensor parallelism on CUDA GPUs"
    if dtype not in SUPPORTED_DTYPES:
        return f"{dtype} is not one of the kernel's dtypes {SUPPORTED_DTYPES}"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy"):
        return "this torch has no symm_mem.one_shot_all_reduce_copy"
    own = torch.cuda.current_device()  # rank r runs on GPU r (parallel_state.init_distributed)
    unreachable = [i for i in range(world_size) if i != own and not torch.cuda.can_device_access_peer(own, i)]
    if unreachable:
        return f"GPU {own} cannot access the memory of GPUs {unreachable} (no peer-to-peer)"
    return None


def _release() -> None:
    """Before the process groups are destroyed (after the graphs that captured it are gone)."""
    global _active
    if _active is not None:
        _active.release()
    _active = None
