"""Runs each model step on every tensor-parallel rank and returns rank 0's result.

tensor_parallel_size == 1: the runner lives in this process and nothing else
happens. Otherwise this process is rank 0: it starts ranks 1..N-1 as
supervised worker processes, and every step it first broadcasts the step's
inputs (StepChannel, no pickling) and then runs its own runner, whose
collectives meet the workers'. Any failure on any rank leaves the ranks out of
step for good, so it makes the executor dead: every later call raises
EngineDeadError with the reason.

Shutting down always ends (see parallel_state): on shutdown(), when the
executor is garbage collected (an LLM going out of scope) and at interpreter
exit, rank 0 tells the workers to leave, every rank releases its CUDA graphs
and the ranks destroy the communicators together; a dead or stuck rank gets
the communicators aborted and its process killed instead.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from engine.distributed import parallel_state
from engine.distributed.step_channel import Command, Field, StepChannel
from engine.distributed.supervisor import WorkerGroup
from engine.distributed.worker import RunnerFactory, StepRunner
from engine.errors import EngineDeadError, KubellmError

logger = logging.getLogger(__name__)

# After a collective fails, how long to wait for the watcher to name the worker that died.
DEATH_NOTICE_S = 5.0
# How long shutdown waits for a step in another thread to finish before it stops the ranks anyway.
STEP_WAIT_S = 10.0


class Executor:
    def __init__(self, config: Any, make_runner: RunnerFactory, field_names: Sequence[str]):
        """`make_runner(config)` builds a rank's runner (on every rank); `field_names` are the
        keys of the dict that the runners' `execute_model` takes."""
        self.world_size: int = config.tensor_parallel_size
        self._ranks: _Ranks | None = None
        if self.world_size == 1:
            self.runner: StepRunner = make_runner(config)
            return
        store = parallel_state.create_store(self.world_size)
        nccl = parallel_state.backend_for(config.device) == "nccl"
        workers = WorkerGroup(
            self.world_size, store.port, config, make_runner, field_names, on_death=_abort_nccl if nccl else None
        )
        self._ranks = _Ranks(workers)
        # The finalizer holds the ranks, not the executor. Registered with atexit here, after
        # multiprocessing was imported, so that it runs before multiprocessing's own exit
        # handler kills the workers (atexit runs last-in first-out).
        self._finalizer = weakref.finalize(self, self._ranks.shutdown)
        atexit.register(self._finalizer)
        try:
            workers.wait_until_started()
            parallel_state.init_distributed(0, self.world_size, store, config.device)
            self._ranks.channel = StepChannel(field_names, parallel_state.metadata_group())
            self.runner = make_runner(config)
            parallel_state.barrier()
        except BaseException as error:
            # rank 0's own errors (a bad model folder, say) are raised as they are
            reason = None if isinstance(error, KubellmError) else workers.wait_for_death(DEATH_NOTICE_S)
            self._ranks.stop(reason or f"rank 0 failed to start: {error!r}", coordinated=False)
            atexit.unregister(self._finalizer)
            if reason is not None:
                raise EngineDeadError(f"tensor-parallel start-up failed: {reason}") from error
            raise

    @property
    def worker_pids(self) -> dict[int, int]:
        """Process ids of ranks 1..N-1 (empty without tensor parallelism)."""
        return self._ranks.workers.pids if self._ranks else {}

    @property
    def dead_reason(self) -> str | None:
        return self._ranks.dead_reason if self._ranks else None

    def execute(self, batch: Any) -> Any:
        """One step: rank 0 prepares the inputs, every rank runs the model, rank 0 samples.

        Returns without waiting for the device. A rank that dies during the step has NCCL
        aborted under it, which ends the collectives early: whoever reads the step's tokens
        calls check_health() once they have arrived, and drops them if a rank died meanwhile.
        """
        if self._ranks is None:
            return self.runner.sample(self.runner.execute_model(self.runner.prepare_step(batch)), batch)
        with self._ranks.step_lock:
            return self.runner.sample(self.execute_model(self.runner.prepare_step(batch)), batch)

    def execute_model(self, fields: dict[str, Field]) -> Any:
        """Runs one forward pass on every rank; returns what rank 0's runner returns."""
        self.check_health()
        if self._ranks is None:
            return self.runner.execute_model(fields)
        with self._ranks.step_lock:
            self.check_health()  # shut down while this thread waited for the lock
            try:
                self._ranks.channel.send(Command.STEP, fields)
                return self.runner.execute_model(fields)
            except Exception as error:
                reason = self._ranks.workers.wait_for_death(DEATH_NOTICE_S) or f"rank 0 failed during a step: {error!r}"
                self._ranks.stop(reason, coordinated=False)
                raise EngineDeadError(reason) from error

    def check_health(self) -> None:
        """Raises EngineDeadError once any rank has died (also between steps, for /health)."""
        ranks = self._ranks
        if ranks is None:
            return
        if ranks.dead_reason is None and ranks.workers.dead_reason is not None:
            ranks.stop(ranks.workers.dead_reason, coordinated=False)
        if ranks.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {ranks.dead_reason}")

    def shutdown(self) -> None:
        """Stops the workers and leaves the process groups; safe to call more than once."""
        if self._ranks is not None:
            self._finalizer()
            atexit.unregister(self._finalizer)


class _Ranks:
    """Rank 0's hold on the workers and the process groups, apart from the Executor so that
    its finalizer can stop them without keeping the executor alive."""

    def __init__(self, workers: WorkerGroup):
        self.workers = workers
        self.channel: StepChannel | None = None
        self.dead_reason: str | None = None
        # A step and a shutdown never interleave on the channel (the server steps in its own thread).
        self.step_lock = threading.RLock()
        self._stop_lock = threading.Lock()

    def shutdown(self) -> None:
        """Every rank leaves together; a rank that is dead (or a step that is stuck) makes it an abort."""
        if not self.step_lock.acquire(timeout=STEP_WAIT_S):
            logger.error("tensor parallelism: a step did not finish within %.0f s; stopping the ranks", STEP_WAIT_S)
            self.stop("the engine was shut down during a step", coordinated=False)
            return
        try:
            if self.dead_reason is not None:
                return
            coordinated = self.workers.dead_reason is None and self.channel is not None
            if coordinated:
                try:
                    self.channel.send(Command.SHUTDOWN)
                except Exception as error:  # noqa: BLE001 - a worker died just now: abort instead
                    logger.warning("tensor parallelism: cannot tell the workers to stop: %r", error)
                    coordinated = False
            self.stop(self.workers.dead_reason or "the engine was shut down", coordinated)
        finally:
            self.step_lock.release()

    def stop(self, reason: str, coordinated: bool) -> None:
        """Sets dead_reason and releases the process groups and the workers (once).

        `coordinated`: the workers were told to leave and do so alongside this rank; otherwise
        they are killed first and the groups aborted.
        """
        with self._stop_lock:
            if self.dead_reason is not None:
                return
            self.dead_reason = reason
            if not coordinated:
                self.workers.shutdown(grace_s=0)
            parallel_state.destroy_distributed(coordinated)
            self.workers.shutdown()


def _abort_nccl(reason: str) -> None:
    """Watcher thread, on a worker's death: gloo collectives fail on their own when a peer's
    socket closes, NCCL ones would wait for the dead rank until their timeout."""
    parallel_state.abort_distributed()
