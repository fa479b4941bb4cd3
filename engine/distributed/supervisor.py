"""Starts the worker processes of a tensor-parallel engine and watches them.

A watcher thread waits on every worker's process sentinel and message pipe.
The first unexpected exit marks the whole group dead, kills the other workers
and calls `on_death` (which starts aborting collectives that would otherwise
wait for the dead rank; it must not block, since this thread also reaps the
workers), so the engine fails at once with the reason instead of hanging.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import Callable, Sequence
from typing import Any

from engine.distributed.worker import FAILED, STARTED, RunnerFactory, run_worker

# A worker asked to shut down that has not exited by then is killed (its own teardown is
# bounded too, and it leaves the process groups alongside rank 0, before rank 0 waits here).
SHUTDOWN_GRACE_S = 5.0


class WorkerGroup:
    """Ranks 1..world_size-1 as child processes (spawned: CUDA cannot be forked)."""

    def __init__(
        self,
        world_size: int,
        store_port: int,
        config: Any,
        make_runner: RunnerFactory,
        field_names: Sequence[str],
        on_death: Callable[[str], None] | None,
    ):
        context = multiprocessing.get_context("spawn")
        self._on_death = on_death
        self._lock = threading.Lock()
        self._started: set[int] = set()
        self._errors: dict[int, str] = {}
        self._stopping = False
        self.dead_reason: str | None = None
        self._died = threading.Event()
        self._processes = {}
        self._conns = {}
        for rank in range(1, world_size):
            parent_conn, child_conn = context.Pipe(duplex=False)
            process = context.Process(
                target=run_worker,
                args=(rank, world_size, store_port, config, make_runner, tuple(field_names), child_conn),
                name=f"kubellm-tp-worker-{rank}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            self._processes[rank] = process
            self._conns[rank] = parent_conn
        self._watcher = threading.Thread(target=self._watch, name="tp-worker-watch", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: p.pid for rank, p in self._processes.items()}

    def wait_until_started(self) -> None:
        """Returns once every worker is about to join the process group; raises if one died first."""
        while not self._died.wait(0.05):
            with self._lock:
                if len(self._started) == len(self._processes):
                    return
        raise RuntimeError(self.dead_reason)

    def wait_for_death(self, timeout: float) -> str | None:
        """The reason a worker died, waiting up to `timeout` s for the watcher to notice it."""
        self._died.wait(timeout)
        return self.dead_reason

    def shutdown(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Waits up to `grace_s` for workers that were told to stop, then kills whatever is left;
        from now on their exits are expected, not deaths."""
        with self._lock:
            self._stopping = True
        self._watcher.join(grace_s)
        self.kill()
        self._watcher.join()

    def kill(self) -> None:
        """Signals every worker; only the watcher thread reaps them (waitpid is not shared)."""
        for process in self._processes.values():
            process.kill()

    def _watch(self) -> None:
        by_waitable = {}
        for rank, process in self._processes.items():
            by_waitable[process.sentinel] = rank
            by_waitable[self._conns[rank]] = rank
        while any(isinstance(w, int) for w in by_waitable):
            for ready in multiprocessing.connection.wait(list(by_waitable)):
                rank = by_waitable[ready]
                if isinstance(ready, int):
                    del by_waitable[ready]
                    self._exited(rank)
                elif not self._receive(rank, ready):
                    del by_waitable[ready]

    def _receive(self, rank: int, conn: multiprocessing.connection.Connection) -> bool:
        """Records one message from a worker; False once its pipe is closed."""
        try:
            kind, text = conn.recv()
        except (EOFError, OSError):
            return False
        with self._lock:
            if kind == STARTED:
                self._started.add(rank)
            elif kind == FAILED:
                self._errors[rank] = text
        return True

    def _exited(self, rank: int) -> None:
        process = self._processes[rank]
        process.join()
        conn = self._conns[rank]
        while conn.poll() and self._receive(rank, conn):  # a failure report may still be queued
            pass
        with self._lock:
            if self._stopping or self.dead_reason is not None:
                return
            reason = f"tensor-parallel worker rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
            if rank in self._errors:
                reason += f":\n{self._errors[rank]}"
            self.dead_reason = reason
        self._died.set()
        self.kill()
        if self._on_death is not None:
            self._on_death(reason)
