"""The process groups of one tensor-parallel engine, and how a rank leaves them.

The default group carries the model's collectives (NCCL on CUDA, gloo on CPU).
A second, gloo-only group carries each step's inputs from rank 0 on CPU
tensors: idle workers wait in it for as long as the server is idle, so it has
no practical timeout, while the model group keeps torch's default one.

Leaving must end even when NCCL would not: ncclCommFinalize and ncclCommAbort
both wait until every CUDA graph that captured one of the communicator's
collectives has been destroyed, and destroying a communicator is collective,
so a rank whose peer is gone waits for it forever. `destroy_distributed`
therefore releases the captured graphs first, meets the other ranks on the
gloo group before destroying, aborts instead when a peer is gone, and bounds
every stage by a deadline after which it gives up and returns.
"""

from __future__ import annotations

import datetime
import logging
import socket
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Idle workers block in a broadcast on the metadata group until the next step
# arrives; liveness is watched by the supervisor, not by this timeout.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# Joining the group happens right after the workers have reported that they started.
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=5)
# Seconds a coordinated teardown (release the graphs, meet, destroy) may take on one rank.
TEARDOWN_TIMEOUT_S = 15.0
# Seconds an abort may take after that, or after a peer died.
ABORT_TIMEOUT_S = 5.0

_metadata_group: dist.ProcessGroup | None = None
_device: torch.device | None = None
# What must be gone before the communicators can be: releases of captured CUDA graphs.
_release_hooks: list[Callable[[], None]] = []
_abort_thread: threading.Thread | None = None
_abort_lock = threading.Lock()


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
    global _metadata_group, _device, _abort_thread
    _device = None
    if device.startswith("cuda"):
        _device = torch.device("cuda", rank)
        torch.cuda.set_device(_device)
    _release_hooks.clear()
    _abort_thread = None
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size)
    _metadata_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def release_before_teardown(release: Callable[[], None]) -> None:
    """Registers a release of something that captured this rank's collectives (CUDA graphs):
    it runs, after the device is synchronised, before the communicators are destroyed."""
    if dist.is_initialized():
        _release_hooks.append(release)


def destroy_distributed(coordinated: bool) -> bool:
    """Leaves the groups so that this process can start another engine later; True if it
    ended cleanly, False if a stage outlasted its deadline (it is left running in the background).

    `coordinated`: every rank is alive and calls this too (after rank 0's SHUTDOWN). The ranks
    release their graphs, meet at a barrier on the gloo group, then destroy the communicators
    together. Otherwise (a peer died, or rank 0 gave up on one) the groups are aborted.
    """
    global _metadata_group
    if not dist.is_initialized():
        return True
    if coordinated:
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_S
        if (
            _within(deadline, "releasing captured CUDA graphs", _release_captures)
            and _within(deadline, "waiting for the other ranks", _meet_other_ranks)
            and _within(deadline, "destroying the process groups", dist.destroy_process_group)
        ):
            _metadata_group = None
            return True
    # A peer is gone or a stage above is stuck: abort, which no peer needs to join.
    deadline = time.monotonic() + ABORT_TIMEOUT_S
    abort = abort_distributed()
    released = _within(deadline, "releasing captured CUDA graphs", _release_captures)
    abort.join(max(0.0, deadline - time.monotonic()))
    _metadata_group = None
    if abort.is_alive():
        logger.error("tensor parallelism: aborting the process groups did not end within %.0f s", ABORT_TIMEOUT_S)
    return released and not abort.is_alive() and not coordinated


def abort_distributed() -> threading.Thread:
    """Starts (once) aborting the groups in the background and returns that thread.

    NCCL kernels blocked on a dead rank return as soon as the abort begins; the abort itself
    ends only once this rank's captured graphs are released (destroy_distributed does that).
    """
    global _abort_thread
    with _abort_lock:
        if _abort_thread is None:
            _abort_thread = threading.Thread(target=_on_device(_abort), name="tp-abort", daemon=True)
            _abort_thread.start()
        return _abort_thread


def _abort() -> None:
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        # First the NCCL backend alone: its abort lets go of the GIL while NCCL waits for the
        # captured graphs to be released; torch's world abort would wait in ncclGroupEnd holding it.
        try:
            dist.group.WORLD._get_backend(torch.device("cuda")).abort()
        except Exception:  # noqa: BLE001 - the world abort below still runs
            logger.warning("tensor parallelism: aborting the NCCL communicators failed", exc_info=True)
    try:
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - a group that cannot abort is destroyed instead
        logger.warning("tensor parallelism: abort failed; destroying the process groups", exc_info=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def _release_captures() -> None:
    """Synchronises the device, then releases (once) every registered capture."""
    synchronize()
    while _release_hooks:
        _release_hooks.pop()()
    synchronize()


def _meet_other_ranks() -> None:
    """Every rank has released its graphs; fails (instead of waiting) if one does not come."""
    dist.monitored_barrier(group=metadata_group(), timeout=datetime.timedelta(seconds=TEARDOWN_TIMEOUT_S))


def _within(deadline: float, stage: str, work: Callable[[], None]) -> bool:
    """Runs `work` in a daemon thread; False (logged) if it failed or is still running at `deadline`."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - reported by the caller's thread below
            failure.append(error)

    thread = threading.Thread(target=_on_device(run), name=f"tp-teardown: {stage}", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if thread.is_alive():
        logger.error("tensor parallelism: %s did not end in time; leaving it behind", stage)
        return False
    if failure:
        logger.warning("tensor parallelism: %s failed: %r", stage, failure[0])
        return False
    return True


def _on_device(work: Callable[[], None]) -> Callable[[], None]:
    """`work` on this rank's GPU: a new thread's current CUDA device is GPU 0 on every rank."""
    device = _device

    def run() -> None:
        if device is not None:
            torch.cuda.set_device(device)
        work()

    return run


def synchronize() -> None:
    """Waits for this rank's queued GPU work (nothing to wait for on CPU)."""
    if _device is not None:
        torch.cuda.synchronize(_device)


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


def broadcast_from_rank0(tensor: torch.Tensor) -> None:
    """Rank 0's `tensor` into every rank's, on the model's group (queued on the stream, no host wait)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, 0)
