"""A real uvicorn serving a real engine on 127.0.0.1, for the server tests.

Each test module starts one server (module-scoped fixture) on a free port, in a
thread of the test process, so tests can also look at the engine directly. The
engine core runs in its own process, as under `kubellm serve`.
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

import openai

from engine.async_engine import AsyncLLMEngine
from engine.config import EngineConfig
from engine.llm import LLM
from engine.server.app import ServerSettings, ServerState, build_app
from engine.testing import default_model_path

SERVED_NAME = "test-model"
# Long enough that a 2000-token request is still running when a test disconnects from it;
# tests keep max_tokens small everywhere else.
MAX_MODEL_LEN = 2048


def engine_config(model: Path | None = None, **overrides) -> EngineConfig:
    settings = dict(model=str(model or default_model_path()), max_model_len=MAX_MODEL_LEN, num_kv_blocks=256,
                    served_model_name=SERVED_NAME, device="cpu")
    return EngineConfig(**(settings | overrides))


def offline_llm() -> LLM:
    """The offline LLM on the servers' model and cache settings: what served outputs must equal."""
    config = engine_config()
    return LLM(model=config.model, max_model_len=config.max_model_len, num_kv_blocks=config.num_kv_blocks,
               device="cpu")


@dataclass
class RunningServer:
    url: str
    engine: AsyncLLMEngine
    state: ServerState

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self) -> openai.OpenAI:
        """The official client, without retries (a test sees each response as it is)."""
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        """Sum of all samples named `name` on /metrics."""
        total, found = 0.0, False
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        assert found, f"{name} not on /metrics"
        return total

    def wait_until(self, condition, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return condition()


def spawned_children(pid: int) -> list[int]:
    """Processes that `pid` started with multiprocessing's spawn (from /proc): a server's engine core, a
    core's tensor-parallel workers; not multiprocessing's resource tracker."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            spawned = parent == pid and b"spawn_main" in (stat.parent / "cmdline").read_bytes()
        except OSError:  # the process exited while we looked
            continue
        if spawned:
            children.append(int(stat.parent.name))
    return children


@contextmanager
def running_server(config: EngineConfig | None = None, api_key: str | None = None,
                   max_pending_requests: int | None = None, **settings_overrides):
    """`settings_overrides`: further ServerSettings fields (sampling_defaults, tool parser, ...)."""
    config = config or engine_config()
    engine = AsyncLLMEngine(config, max_pending_requests=max_pending_requests)
    settings = ServerSettings(served_model_name=config.name, api_key=api_key, shutdown_timeout=5.0,
                              **settings_overrides)
    app = build_app(engine, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", engine, app.state.server)
    try:
        assert running.wait_until(lambda: server.started and engine.is_ready, timeout=120), engine.error
        yield running
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()

