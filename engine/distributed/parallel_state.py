"""The process groups of one tensor-parallel engine.

The default group carries the model's collectives (NCCL on CUDA, gloo on CPU).
A second, gloo-only group carries each step's inputs from rank 0 on CPU
tensors: idle workers wait in it for as long as the server is idle, so it has
no practical timeout, while the model group keeps torch's default one.
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

# Idle workers block in a broadcast on the metadata group until the next step
# arrives; liveness is watched by the supervisor, not by this timeout.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# Joining the group happens right after the workers have reported that they started.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)

_metadata_group: dist.ProcessGroup | None = None


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def create_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port of 127.0.0.1 (one host: all ranks are local)."""
    return dist.TCPStore(
        socket.gethostbyname("localhost"),
        0,
        world_size,
        is_master=True,
        timeout=RENDEZVOUS_TIMEOUT,
        wait_for_workers=False,
    )


def connect_store(port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(
        socket.gethostbyname("localhost"), port, world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT
    )


def init_distributed(rank: int, world_size: int, store: dist.Store, device: str) -> None:
    """Joins this process to the engine's groups; on CUDA, rank r uses GPU r."""
    global _metadata_group
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size)
    _metadata_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def destroy_distributed() -> None:
    """Leaves the groups so that this process can start another engine later."""
    global _metadata_group
    _metadata_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def abort_distributed() -> None:
    """Makes collectives blocked on a dead rank fail instead of waiting for their timeout."""
    global _metadata_group
    _metadata_group = None
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None:
        abort()
    else:
        dist.destroy_process_group()


def metadata_group() -> dist.ProcessGroup:
    if _metadata_group is None:
        raise RuntimeError("tensor parallelism is not initialised in this process")
    return _metadata_group


def barrier() -> None:
    """Waits for every rank on the metadata group, which fails at once if a rank has died."""
    dist.barrier(group=metadata_group())


def min_across_ranks(value: int) -> int:
    """The smallest of every rank's value (e.g. KV-cache blocks that fit): all ranks must agree."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=metadata_group())
    return int(t.item())
