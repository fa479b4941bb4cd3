"""The main function of a tensor-parallel worker process (ranks 1..N-1).

A worker builds the same ModelRunner as rank 0 on its own slice of the model,
then replays every step rank 0 sends (and receives the ids rank 0 sampled in
it, which the next step's inputs may refer to) until told to shut down, when it leaves
the process groups together with rank 0. It reports a failure to the
supervisor as text before exiting, and exits by itself when its parent dies,
so no worker outlives the engine that started it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from engine.distributed import parallel_state
from engine.distributed.step_channel import Command, Field, StepChannel


class StepRunner(Protocol):
    """What the executor needs from a ModelRunner (`batch` is opaque here)."""

    def prepare_step(self, batch: Any) -> dict[str, Field]:
        """Rank 0: the step's inputs as CPU tensors and ints."""

    def execute_model(self, fields: dict[str, Field]) -> Any:
        """Every rank: the forward pass (its collectives meet the other ranks')."""

    def sample(self, result: Any, batch: Any) -> Any:
        """Rank 0: next tokens from what its execute_model returned."""

    def receive_sampled(self, fields: dict[str, Field]) -> None:
        """Ranks 1..N-1, after execute_model: what rank 0's sample shares with them."""


# Builds this rank's runner from the engine config, after the process groups exist
# (layers read their rank and the group size from torch.distributed).
RunnerFactory = Callable[[Any], StepRunner]

STARTED = "started"
FAILED = "failed"
# Exit code of a worker whose teardown outlasted its deadline (it was left running in the background).
TEARDOWN_FAILED = 2


def run_worker(
    rank: int,
    world_size: int,
    store_port: int,
    config: Any,
    make_runner: RunnerFactory,
    field_names: Sequence[str],
    conn: multiprocessing.connection.Connection,
) -> None:
    # Ctrl-C and a SIGTERM sent to the whole process group (`timeout`, `kill -- -PGID`) reach
    # the workers too; rank 0 decides when they stop, and they exit when it dies.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_when_parent_dies()
    try:
        device = config.device
        if not device.startswith("cuda"):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        store = parallel_state.connect_store(store_port, world_size)
        conn.send((STARTED, None))
        parallel_state.init_distributed(rank, world_size, store, device)
        runner = make_runner(config)
        parallel_state.barrier()
        channel = StepChannel(field_names, parallel_state.metadata_group(), pin=device.startswith("cuda"))
        while True:
            command, fields = channel.receive()
            if command is Command.SHUTDOWN:
                break
            runner.execute_model(fields)
            runner.receive_sampled(fields)
    except BaseException:
        # Exit at once: rank 0 learns of a death from the exit, and a process that still holds
        # NCCL communicators and CUDA graphs could hang in the interpreter's own teardown.
        error = traceback.format_exc()
        try:
            conn.send((FAILED, error))
        finally:
            sys.stderr.write(error)
            sys.stderr.flush()
            os._exit(1)
    if not parallel_state.destroy_distributed(coordinated=True):
        os._exit(TEARDOWN_FAILED)


def exit_when_parent_dies() -> None:
    """A spawned process (worker, engine core) exits with its parent, so no orphan holds a GPU."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
