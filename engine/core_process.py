"""The engine core's step loop, behind two ZeroMQ sockets; run in its own process by `kubellm serve`.

The API process (engine.core_client) binds a PUSH socket of requests, aborts
and stops, and a PULL socket for outputs; this loop connects to both. Between
steps it takes in everything queued (non-blocking), steps the core and sends
that step's EngineCoreOutputs. With nothing to do it blocks on the input
socket, waking every HEALTH_CHECK_INTERVAL_S to ask the core whether its
tensor-parallel workers are still alive (so a dead worker is reported without
waiting for traffic) and to send its stats as a heartbeat: the API process
hears from a healthy core at least that often, idle or busy, and can tell a
hung one. Any exception is sent as CoreFailed before the loop
raises it; the process then exits non-zero.

Running the core apart from the HTTP server gives the step loop an
interpreter (and GIL) of its own, as vLLM V1's EngineCoreProc does. This
process is tensor-parallel rank 0 and starts the other ranks itself.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import zmq

from engine.config import EngineConfig
from engine.core_codec import AbortRequests, CoreFailed, CoreReady, Shutdown, StepOutputs, StopSequences, decode, encode
from engine.core_messages import EngineCoreOutputs, EngineCoreRequest
from engine.distributed.worker import exit_when_parent_dies
from engine.cpu_threads import configure_cpu_threads
from engine.engine_core import EngineCore
from engine.startup_report import log_startup_report
from engine.errors import KubellmError

logger = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 1.0
# How long closing the output socket may wait to deliver the last message (CoreFailed).
LINGER_MS = 2000


@dataclass(frozen=True)
class CoreAddresses:
    """ZeroMQ endpoints the API process bound: requests travel on one, outputs on the other."""

    to_core: str
    from_core: str


def run_core_process(
    config: EngineConfig, addresses: CoreAddresses, log_level: str | None, served_address: str | None
) -> None:
    """Entry point of the spawned core process: exits 0 after a shutdown, 1 after a failure."""
    if log_level is not None:
        from engine.server.logs import configure_logging

        configure_logging(log_level)
    # Ctrl-C reaches the whole process group; the API process drains first and then stops the core.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: terminated.set())
    exit_when_parent_dies()
    try:
        serve_core(partial(load_core, config, served_address), addresses, terminated.is_set)
    except BaseException:  # noqa: BLE001 - already reported to the API process as CoreFailed
        sys.exit(1)


def load_core(config: EngineConfig, served_address: str | None) -> EngineCore:
    """The core of `kubellm serve`: CPU threads set for this machine, and the start-up report logged."""
    configure_cpu_threads()
    core = EngineCore(config)
    log_startup_report(core, config, served_address)
    return core


def serve_core(make_core: Callable[[], EngineCore], addresses: CoreAddresses, should_stop: Callable[[], bool]) -> None:
    """Loads the core, reports CoreReady (or CoreFailed) and runs the step loop until told to stop."""
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(addresses.to_core)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, LINGER_MS)
    outbox.connect(addresses.from_core)
    core: EngineCore | None = None
    try:
        core = make_core()
        outbox.send(encode(CoreReady(core.limits, core.get_stats())))
        _step_loop(core, inbox, outbox, should_stop)
    except BaseException as error:
        # kubellm's own errors carry a complete message, which the API process reports;
        # anything else is a bug whose traceback only this process has.
        if not isinstance(error, KubellmError):
            logger.exception("engine core failed")
        outbox.send(encode(CoreFailed.of(error)))
        raise
    finally:
        if core is not None:
            core.shutdown()  # stops the tensor-parallel workers
        inbox.close(linger=0)
        outbox.close()
        context.term()


def _step_loop(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, should_stop: Callable[[], bool]) -> None:
    num_requests_received = 0
    while not should_stop():
        if not core.has_unfinished_requests() and not inbox.poll(HEALTH_CHECK_INTERVAL_S * 1000):
            core.check_health()
            outbox.send(encode(StepOutputs(EngineCoreOutputs(stats=core.get_stats()), num_requests_received)))
            continue
        took_input = False
        while inbox.poll(0):
            took_input = True
            match decode(inbox.recv()):
                case EngineCoreRequest() as request:
                    core.add_request(request)
                    num_requests_received += 1
                case AbortRequests(request_ids):
                    core.abort_requests(request_ids)
                case StopSequences(stopped):
                    core.stop_sequences(stopped)
                case Shutdown():
                    return
        if core.has_unfinished_requests():
            outputs = core.step()
        elif took_input:  # aborts freed blocks without a step: the API process still needs the new stats
            outputs = EngineCoreOutputs()
        else:
            continue
        outputs.stats = core.get_stats()  # the API process's metrics and queue depth read these
        outbox.send(encode(StepOutputs(outputs, num_requests_received)))
