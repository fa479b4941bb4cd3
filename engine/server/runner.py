"""Running the app under uvicorn with Kubernetes-friendly shutdown.

Plain uvicorn closes its listening socket on SIGTERM. Rolling updates need
more: /ready must turn 503 at once (so the Service stops routing here), new
requests get a 503 the client can retry elsewhere, in-flight requests get up
to --shutdown-timeout to finish and the rest end with finish_reason "abort".
Only then does uvicorn shut down, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from engine.server.app import ServerState

logger = logging.getLogger(__name__)

# Seconds uvicorn waits for connections to close after draining has already finished them.
CONNECTION_CLOSE_TIMEOUT = 5


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains the app; a second one ends it at once.

    At once, yet cleanly: the requests still running end with finish_reason
    "abort", the engine core is killed mid-step (its workers leave with it), and
    the process exits 0 once the aborted streams have been sent.
    """

    def __init__(self, app: FastAPI, host: str, port: int):
        super().__init__(
            uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                           timeout_graceful_shutdown=CONNECTION_CLOSE_TIMEOUT)
        )
        self.state: ServerState = app.state.server
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self._background: set[asyncio.Task] = set()

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._spawn(self._exit_if_model_fails_to_load())
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): it records the signal and re-raises it after shutdown, which
        # would make the process die of SIGTERM instead of exiting 0 after a clean drain.
        if self._loop is None:
            self.should_exit = True
            return
        if self._draining:
            logger.info("received %s again: aborting what runs and exiting now", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._exit_now)
            return
        self._draining = True
        logger.info("received %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._spawn, self._drain_then_exit())

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _exit_now(self) -> None:
        self.state.abort_all()
        self.state.engine.kill_core()
        self.should_exit = True

    async def _drain_then_exit(self) -> None:
        await self.state.drain()
        logger.info("drained; shutting down")
        self.should_exit = True

    async def _exit_if_model_fails_to_load(self) -> None:
        try:
            await self.state.engine.wait_until_loaded()
        except Exception as exc:  # noqa: BLE001 - reported as one line, then the process exits 1
            logger.error("cannot start the engine: %s", exc)
            self.exit_code = 1
            self.should_exit = True
