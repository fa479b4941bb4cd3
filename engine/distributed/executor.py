"""Runs each model step on every tensor-parallel rank and returns rank 0's result.

tensor_parallel_size == 1: the runner lives in this process and nothing else
happens. Otherwise this process is rank 0: it starts ranks 1..N-1 as
supervised worker processes, and every step it first broadcasts the step's
inputs (StepChannel, no pickling) and then runs its own runner, whose
collectives meet the workers'. Any failure on any rank leaves the ranks out of
step for good, so it makes the executor dead: every later call raises
EngineDeadError with the reason.
"""

from __future__ import annotations

import atexit
from collections.abc import Sequence
from typing import Any

from engine.distributed import parallel_state
from engine.distributed.step_channel import Command, Field, StepChannel
from engine.distributed.supervisor import WorkerGroup
from engine.distributed.worker import RunnerFactory, StepRunner
from engine.errors import EngineDeadError, KubellmError

# After a collective fails, how long to wait for the watcher to name the worker that died.
DEATH_NOTICE_S = 5.0


class Executor:
    def __init__(self, config: Any, make_runner: RunnerFactory, field_names: Sequence[str]):
        """`make_runner(config)` builds a rank's runner (on every rank); `field_names` are the
        keys of the dict that the runners' `execute_model` takes."""
        self.world_size: int = config.tensor_parallel_size
        self.dead_reason: str | None = None
        self._workers: WorkerGroup | None = None
        self._channel: StepChannel | None = None
        if self.world_size == 1:
            self.runner: StepRunner = make_runner(config)
            return
        self._device: str = config.device
        # Before multiprocessing's own exit handler kills the workers (atexit runs last-in first-out).
        atexit.register(self.shutdown)
        store = parallel_state.create_store(self.world_size)
        self._workers = WorkerGroup(
            self.world_size, store.port, config, make_runner, field_names, on_death=self._on_worker_death
        )
        try:
            self._workers.wait_until_started()
            parallel_state.init_distributed(0, self.world_size, store, config.device)
            self._channel = StepChannel(field_names, parallel_state.metadata_group())
            self.runner = make_runner(config)
            parallel_state.barrier()
        except BaseException as error:
            # rank 0's own errors (a bad model folder, say) are raised as they are
            reason = None if isinstance(error, KubellmError) else self._workers.wait_for_death(DEATH_NOTICE_S)
            self._stop(reason or f"rank 0 failed to start: {error!r}")
            if reason is not None:
                raise EngineDeadError(f"tensor-parallel start-up failed: {reason}") from error
            raise

    @property
    def worker_pids(self) -> dict[int, int]:
        """Process ids of ranks 1..N-1 (empty without tensor parallelism)."""
        return self._workers.pids if self._workers else {}

    def execute(self, batch: Any) -> Any:
        """One step: rank 0 prepares the inputs, every rank runs the model, rank 0 samples."""
        return self.runner.sample(self.execute_model(self.runner.prepare_step(batch)), batch)

    def execute_model(self, fields: dict[str, Field]) -> Any:
        """Runs one forward pass on every rank; returns what rank 0's runner returns."""
        self.check_health()
        if self._channel is None:
            return self.runner.execute_model(fields)
        try:
            self._channel.send(Command.STEP, fields)
            return self.runner.execute_model(fields)
        except Exception as error:
            reason = self._workers.wait_for_death(DEATH_NOTICE_S) or f"rank 0 failed during a step: {error!r}"
            self._stop(reason)
            raise EngineDeadError(reason) from error

    def check_health(self) -> None:
        """Raises EngineDeadError once any rank has died (also between steps, for /health)."""
        if self._workers is not None and self.dead_reason is None and self._workers.dead_reason is not None:
            self._stop(self._workers.dead_reason)
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead: {self.dead_reason}")

    def shutdown(self) -> None:
        """Stops the workers and leaves the process groups; safe to call more than once."""
        if self._workers is None or self.dead_reason is not None:
            return
        try:
            if self._workers.dead_reason is None and self._channel is not None:
                self._channel.send(Command.SHUTDOWN)
        finally:
            self._stop(self._workers.dead_reason or "the engine was shut down")

    def _stop(self, reason: str) -> None:
        """Sets dead_reason (once) and releases the workers and the process groups."""
        atexit.unregister(self.shutdown)
        self.dead_reason = reason
        self._workers.shutdown()
        parallel_state.destroy_distributed()

    def _on_worker_death(self, reason: str) -> None:
        """Watcher thread: gloo collectives fail on their own when a peer's socket closes, NCCL
        ones would wait for the dead rank until their timeout, so they are aborted."""
        if parallel_state.backend_for(self._device) == "nccl":
            parallel_state.abort_distributed()
