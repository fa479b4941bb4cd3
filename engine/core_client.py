"""The API process's side of the engine core: owns it, talks to it, turns its outputs into streams.

The core runs in a spawned process (what `kubellm serve` uses) or, for tests
that want one interpreter, in a thread of this process; either way it is
reached through the same two ZeroMQ sockets (engine.core_process). A receive
task on the event loop decodes each step's EngineCoreOutputs, runs the
OutputProcessor (detokenizing happens here, never in the core), hands every
RequestOutput to its request's asyncio queue and sends completions ended by a
stop string back to the core as stops.

When the core goes away (CoreFailed, or the process exits without a word)
the client takes in what the core sent before it went, then every open
stream gets EngineDeadError and `error` is set, which /health and /ready read.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import zmq
import zmq.asyncio

from engine.config import EngineConfig
from engine.core_codec import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    FromCore,
    Shutdown,
    StepOutputs,
    StopSequences,
    ToCore,
    decode,
    encode,
)
from engine.core_messages import CoreLimits, EngineCoreRequest, EngineStats
from engine.core_process import CoreAddresses, run_core_process, serve_core
from engine.engine_core import EngineCore
from engine.errors import EngineDeadError
from engine.output_processor import OutputProcessor, RequestState
from engine.outputs import RequestOutput

logger = logging.getLogger(__name__)

# Seconds the core gets to stop its workers after Shutdown before it is terminated.
SHUTDOWN_TIMEOUT_S = 10.0
# Seconds to wait, once the core has exited, for messages it sent just before.
LAST_MESSAGES_WAIT_MS = 200

StreamItem = RequestOutput | BaseException


class _CoreProcess:
    """The core in a spawned process (spawn: CUDA cannot be forked). Not a daemon: it starts tp workers."""

    def __init__(self, config: EngineConfig, addresses: CoreAddresses, log_level: str | None, served_address: str | None):
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=run_core_process, args=(config, addresses, log_level, served_address), name="kubellm-engine-core"
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self, on_exit: asyncio.Future) -> None:
        self.process.start()
        # multiprocessing joins non-daemonic children at exit; a core nobody stopped would never end.
        atexit.register(self._terminate, SHUTDOWN_TIMEOUT_S)
        loop = asyncio.get_running_loop()
        sentinel = self.process.sentinel

        def exited() -> None:
            loop.remove_reader(sentinel)
            if not on_exit.done():
                on_exit.set_result(None)

        loop.add_reader(sentinel, exited)

    def exit_reason(self) -> str:
        self.process.join(1)
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"the engine core process was killed by {signal.Signals(-code).name}"
        return f"the engine core process exited with code {code}"

    def stop(self, timeout: float) -> None:
        """After Shutdown was sent: waits for the core to exit, then kills it.

        No SIGTERM in between: the core reads it, like Shutdown, only between steps,
        so a core still in a slow step would ignore it just the same.
        """
        atexit.unregister(self._terminate)
        self.process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL now, whatever the core is doing (its tensor-parallel workers exit with it)."""
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def _terminate(self, timeout: float) -> None:
        if self.process.is_alive():
            self.process.terminate()  # the core stops its tp workers and exits 0
            self.process.join(timeout)
        self.kill()


class _CoreThread:
    """The core in a thread of this process: one interpreter, for tests; same sockets and messages."""

    pid = None

    def __init__(self, config: EngineConfig, addresses: CoreAddresses):
        self._stopping = threading.Event()
        self._config = config
        self._addresses = addresses
        self.thread: threading.Thread | None = None

    def start(self, on_exit: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                serve_core(lambda: EngineCore(self._config), self._addresses, self._stopping.is_set)
            except BaseException:  # noqa: BLE001 - serve_core reported it as CoreFailed
                pass
            finally:
                loop.call_soon_threadsafe(lambda: on_exit.done() or on_exit.set_result(None))

        self.thread = threading.Thread(target=run, name="kubellm-engine-core", daemon=True)
        self.thread.start()

    def exit_reason(self) -> str:
        return "the engine core thread exited"

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def kill(self) -> None:
        """A thread cannot be killed: it stops after its current step."""
        self._stopping.set()


class CoreClient:
    """One engine core, the sockets to it, and the streams of the requests it runs."""

    def __init__(self, config: EngineConfig, in_process: bool = False, log_level: str | None = None,
                 served_address: str | None = None):
        self._socket_dir = Path(tempfile.mkdtemp(prefix="kubellm-core-"))
        addresses = CoreAddresses(f"ipc://{self._socket_dir}/to-core", f"ipc://{self._socket_dir}/from-core")
        self._core = (
            _CoreThread(config, addresses) if in_process
            else _CoreProcess(config, addresses, log_level, served_address)
        )
        self._context = zmq.asyncio.Context()
        # A plain (blocking) socket: sends come from sync code (abort) and never wait (no high-water mark).
        self._to_core = self._context.socket(zmq.PUSH, socket_class=zmq.Socket)
        self._to_core.setsockopt(zmq.SNDHWM, 0)
        self._to_core.bind(addresses.to_core)
        self._from_core = self._context.socket(zmq.PULL)
        self._from_core.bind(addresses.from_core)
        self.output_processor: OutputProcessor | None = None  # set by the owner once the tokenizer is loaded
        self.streams: dict[str, asyncio.Queue[StreamItem]] = {}
        self.ready: CoreReady | None = None
        self.stats: EngineStats | None = None
        self.error: BaseException | None = None
        self.num_requests_sent = 0
        self.num_requests_received = 0  # by the core, as of its last message
        self.last_heard = time.monotonic()  # when the core's last message arrived (it sends one per second idle)
        self._exited: asyncio.Future | None = None
        self._receiver: asyncio.Task | None = None
        self._closed = False
        self._shutting_down = False  # Shutdown sent: the core's exit is expected, not a death to report

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Starts the core and the receive task; call from the event loop that will use the client."""
        self._exited = asyncio.get_running_loop().create_future()
        self._core.start(self._exited)
        self._receiver = asyncio.ensure_future(self._receive())

    @property
    def is_started(self) -> bool:
        return self._exited is not None

    @property
    def is_alive(self) -> bool:
        """Started and not failed; the receive task sets `error` once the core has exited."""
        return self.is_started and self.error is None

    @property
    def core_pid(self) -> int | None:
        """The core process's id (None in-process)."""
        return self._core.pid

    @property
    def limits(self) -> CoreLimits:
        assert self.ready is not None, "the engine core is not ready"
        return self.ready.limits

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """stop(), waiting for the core to finish its step and exit without blocking the event loop,
        so that kill_core() (a second signal) still gets through; after `timeout` the core is killed."""
        if self._closed:
            return
        if self._request_shutdown():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._exited), timeout)
            self._core.kill()
        self.stop()

    def kill_core(self) -> None:
        """Ends the core now, even in the middle of a step (the requests in flight are lost)."""
        self._shutting_down = True
        self._core.kill()

    def _request_shutdown(self) -> bool:
        """Sends Shutdown to a running core; False if there is none to tell."""
        if not self.is_started or self.error is not None or self._exited.done():
            return False
        if not self._shutting_down:
            self._shutting_down = True
            self._send(Shutdown())
        return True

    def stop(self) -> None:
        """Shuts the core down (its workers too) and fails what is still open; the client is unusable after."""
        if self._closed:
            return
        self._request_shutdown()
        self._closed = True
        if self.is_started:
            self._core.stop(SHUTDOWN_TIMEOUT_S)
        if self._receiver is not None:
            self._receiver.cancel()
        self._fail(EngineDeadError("the engine was stopped"))
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._context.term()
        shutil.rmtree(self._socket_dir, ignore_errors=True)

    # --- requests -----------------------------------------------------------------------

    def add_request(self, request: EngineCoreRequest, state: RequestState) -> asyncio.Queue[StreamItem]:
        """Sends a validated request to the core; its outputs arrive on the returned queue."""
        if self.error is not None:
            raise self.error
        queue: asyncio.Queue[StreamItem] = asyncio.Queue()
        self.streams[request.request_id] = queue
        self.output_processor.add_request(state)
        self._send(request)
        self.num_requests_sent += 1
        return queue

    def abort_requests(self, request_ids: list[str], notify_client: bool) -> None:
        """Ends requests now; with notify_client each stream gets a last output with finish_reason 'abort'."""
        for request_id in request_ids:
            queue = self.streams.pop(request_id, None)
            last = self.output_processor.abort_request(request_id)
            if notify_client and queue is not None and last is not None:
                queue.put_nowait(last)
        if request_ids and self.error is None:
            self._send(AbortRequests(request_ids))

    @property
    def num_unscheduled(self) -> int:
        """Requests sent that the core had not taken in as of its last message."""
        return self.num_requests_sent - self.num_requests_received

    # --- receiving ------------------------------------------------------------------------

    async def wait_until_ready(self) -> CoreReady:
        while self.ready is None:
            if self.error is not None:
                raise self.error
            await asyncio.sleep(0.05)
        return self.ready

    async def _receive(self) -> None:
        try:
            while not self._exited.done():
                message = self._from_core.recv()
                await asyncio.wait({message, self._exited}, return_when=asyncio.FIRST_COMPLETED)
                if not message.done():
                    message.cancel()
                    break
                self._handle(decode(message.result()))
            while await self._from_core.poll(LAST_MESSAGES_WAIT_MS):
                self._handle(decode(await self._from_core.recv()))
            self._fail(EngineDeadError(self._core.exit_reason()))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # noqa: BLE001 - a bug here must not leave streams hanging
            logger.exception("the engine core client failed")
            self._fail(EngineDeadError(f"the engine core client failed: {error}"))

    def _handle(self, message: FromCore) -> None:
        self.last_heard = time.monotonic()
        match message:
            case StepOutputs(outputs, num_requests_received):
                self.stats = outputs.stats or self.stats
                self.num_requests_received = num_requests_received
                if not (outputs.deltas or outputs.scheduled):
                    return  # stats only (a heartbeat, or aborts applied while idle), maybe before the tokenizer
                processed = self.output_processor.process(outputs)
                if processed.stopped and self.error is None:
                    self._send(StopSequences(processed.stopped))
                for output in processed.outputs:
                    queue = self.streams.pop(output.request_id, None) if output.finished else (
                        self.streams.get(output.request_id))
                    if queue is not None:
                        queue.put_nowait(output)
            case CoreReady(_, stats):
                self.ready, self.stats = message, stats
            case CoreFailed():
                self._fail(message.to_exception())

    def _fail(self, error: BaseException) -> None:
        """Records why the core is gone (the first reason wins) and ends every open stream with it."""
        if self.error is None:
            self.error = error
            # A load failure is reported by whoever waits for it; an exit asked for is no failure.
            if self.ready is not None and not (self._closed or self._shutting_down):
                logger.error("engine core died: %s", error)
        dead = self.error if isinstance(self.error, EngineDeadError) else EngineDeadError(
            f"the engine core died: {self.error}")
        streams, self.streams = self.streams, {}
        for request_id, queue in streams.items():
            self.output_processor.abort_request(request_id)
            queue.put_nowait(dead)

    def _send(self, message: ToCore) -> None:
        if not self._closed:
            self._to_core.send(encode(message))
