"""AsyncLLMEngine: one background step loop feeding many asyncio request streams.

LLMEngine is synchronous and not thread-safe, so exactly one thread (the step
thread) ever touches it: it loads the model, applies queued adds and aborts,
runs `step()` and hands each RequestOutput to the asyncio queue of the request
it belongs to. The event loop never waits on a step, and an exception raised
while adding one request is delivered to that request alone. If the step loop
itself dies, every open stream receives EngineDeadError and `is_alive` turns
false, so health checks fail instead of requests hanging.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from engine.errors import EngineDeadError, InvalidRequestError, KubellmError
from engine.output_processor import OutputKind
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

# How often an idle step loop asks the engine whether it is still whole (a tensor-parallel
# worker may die between requests), so that /health fails without waiting for traffic.
HEALTH_CHECK_INTERVAL_S = 1.0


class EngineNotReadyError(KubellmError):
    """The model is still loading, or the server is draining; the client should retry later."""


class QueueFullError(KubellmError):
    """More requests are waiting than --max-pending-requests allows."""


@dataclass
class _PendingAdd:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float
    output_kind: OutputKind


@dataclass
class _Stream:
    """The asyncio side of one request: where the step thread delivers its outputs."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def deliver(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class _Inbox:
    """Work handed from the event loop to the step thread, guarded by one condition."""

    adds: list[_PendingAdd] = field(default_factory=list)
    aborts: list[tuple[str, bool]] = field(default_factory=list)  # (request id, tell the client)


class AsyncLLMEngine:
    """Asyncio front end over an LLMEngine built (and then stepped) in a dedicated thread."""

    def __init__(self, engine_factory: Callable[[], Any], max_pending_requests: int | None = None):
        self._engine_factory = engine_factory
        self.max_pending_requests = max_pending_requests
        self.engine: Any = None  # set by the step thread once the model is loaded
        self._condition = threading.Condition()
        self._inbox = _Inbox()
        self._streams: dict[str, _Stream] = {}
        self._stats: Any = None  # EngineStats snapshot taken by the step thread after each step
        self._loaded = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kubellm-step-loop", daemon=True)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_started(self) -> bool:
        return self._thread.ident is not None

    @property
    def is_loaded(self) -> bool:
        return self._loaded.is_set()

    @property
    def is_alive(self) -> bool:
        """Liveness: the step thread runs (or is still loading) and has not died."""
        return self.error is None and self._thread.is_alive()

    @property
    def is_ready(self) -> bool:
        return self.is_alive and self.is_loaded

    async def wait_until_loaded(self, poll_interval: float = 0.05) -> None:
        """Returns once the model is loaded; raises the load error if loading failed."""
        while not self._loaded.is_set():
            if self.error is not None:
                raise self.error
            if not self._thread.is_alive() and self.is_started:
                raise EngineDeadError("the step loop exited before the model was loaded")
            await asyncio.sleep(poll_interval)

    # --- what the server reads -------------------------------------------------------------

    @property
    def stats(self) -> Any:
        """The engine's EngineStats as of the last step (None before the model is loaded)."""
        return self._stats

    @property
    def num_unscheduled(self) -> int:
        """Requests queued in this front end that the engine has not seen yet."""
        return len(self._inbox.adds)

    @property
    def num_waiting(self) -> int:
        """Queue depth: front-end queue plus the engine's waiting requests."""
        engine_waiting = self._stats.num_waiting if self._stats is not None else 0
        return self.num_unscheduled + engine_waiting

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # --- requests --------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, of `output_kind`, until it finishes.

        Leaving the iteration early (client disconnect, cancellation) aborts the
        request, which frees its KV blocks at the next step boundary.
        """
        self.check_accepting()
        stream = _Stream(loop=asyncio.get_running_loop(), queue=asyncio.Queue())
        pending = _PendingAdd(request_id, prompt, params, arrival_time or time.monotonic(), output_kind)
        with self._condition:
            if self.error is not None:  # checked under the lock: _fail_all cannot miss this stream
                raise _step_loop_died(self.error)
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in flight")
            self._streams[request_id] = stream
            self._inbox.adds.append(pending)
            self._condition.notify()
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str, notify_client: bool = False) -> None:
        """Abort one request. With notify_client its stream ends with finish_reason 'abort'."""
        with self._condition:
            stream = self._streams.get(request_id) if notify_client else self._streams.pop(request_id, None)
            if stream is None:
                return
            self._inbox.adds = [add for add in self._inbox.adds if add.request_id != request_id]
            self._inbox.aborts.append((request_id, notify_client))
            self._condition.notify()

    def abort_all(self) -> None:
        """Abort every request in flight; their clients see finish_reason 'abort'."""
        for request_id in list(self._streams):
            self.abort(request_id, notify_client=True)

    def check_accepting(self) -> None:
        if self.error is not None:
            raise _step_loop_died(self.error)
        if not self.is_loaded:
            raise EngineNotReadyError("the model is still loading")
        if self.max_pending_requests is not None and self.num_waiting >= self.max_pending_requests:
            raise QueueFullError(
                f"{self.num_waiting} requests are already waiting (--max-pending-requests={self.max_pending_requests})"
            )

    # --- the step thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine = self._engine_factory()
            self._stats = self.engine.get_stats()
            self._loaded.set()
            while self._next_batch_of_work():
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
                self._stats = self.engine.get_stats()
            self._fail_all(EngineDeadError("the engine was stopped"))
        except BaseException as exc:  # noqa: BLE001 - whatever killed the loop is reported, not swallowed
            # kubellm's own errors carry a complete message; anything else is a bug worth a traceback.
            logger.error("engine step loop died: %s", exc, exc_info=not isinstance(exc, KubellmError))
            self._fail_all(exc)
        finally:
            if self.engine is not None:
                self.engine.shutdown()  # stops tensor-parallel workers

    def _next_batch_of_work(self) -> bool:
        """Waits for work, applies queued aborts and adds; False once stop() was called."""
        with self._condition:
            while not (
                self._stopping or self._inbox.adds or self._inbox.aborts or self.engine.has_unfinished_requests()
            ):
                self._condition.wait(HEALTH_CHECK_INTERVAL_S)
                self.engine.check_health()
            if self._stopping:
                return False
            inbox, self._inbox = self._inbox, _Inbox()
        for request_id, notify_client in inbox.aborts:
            aborted = self.engine.abort_request(request_id)
            if notify_client:
                self._finish_aborted(request_id, aborted[0] if aborted else None)
        for add in inbox.adds:
            self._add(add)
        return True

    def _add(self, add: _PendingAdd) -> None:
        try:
            self.engine.add_request(add.request_id, add.prompt, add.params, arrival_time=add.arrival_time,
                                    output_kind=add.output_kind)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone; the loop keeps going
            with self._condition:
                stream = self._streams.pop(add.request_id, None)
            if stream is not None:
                stream.deliver(exc)

    def _dispatch(self, outputs: Iterable[RequestOutput]) -> None:
        for output in outputs:
            with self._condition:
                stream = self._streams.pop(output.request_id, None) if output.finished else (
                    self._streams.get(output.request_id)
                )
            if stream is not None:
                stream.deliver(output)

    def _finish_aborted(self, request_id: str, output: RequestOutput | None) -> None:
        with self._condition:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.deliver(output or _aborted_before_any_output(request_id))

    def _fail_all(self, exc: BaseException) -> None:
        self.error = exc
        with self._condition:
            streams, self._streams = self._streams, {}
        dead = exc if isinstance(exc, EngineDeadError) else _step_loop_died(exc)
        for stream in streams.values():
            stream.deliver(dead)


def _step_loop_died(error: BaseException) -> EngineDeadError:
    return EngineDeadError(f"the engine step loop died: {error}")


def _aborted_before_any_output(request_id: str) -> RequestOutput:
    """The final output of a request the server aborted before the engine took it."""
    return RequestOutput(request_id, None, [], [CompletionOutput(0, "", [], finish_reason="abort")], True)
