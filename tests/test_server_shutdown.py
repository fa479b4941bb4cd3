"""SIGTERM during a stream, against `kubellm serve` as a real subprocess.

What rolling updates rely on: /ready turns 503 at once, new requests get 503
(the socket stays open while draining), a request still running at
--shutdown-timeout ends with finish_reason "abort" and [DONE], and the process
exits 0. (That requests finishing within the timeout are left alone is checked
without a subprocess in test_async_engine.py.) With tensor parallelism the
workers leave with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from engine.testing import default_model_path
from server_harness import spawned_children

SHUTDOWN_TIMEOUT = 2.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kubellm() -> str:
    script = Path(sys.executable).with_name("kubellm")
    return str(script) if script.exists() else "kubellm"


@contextmanager
def serving(*extra_args: str):
    """`kubellm serve` of the default model on a free port, once /ready answers 200."""
    port = free_port()
    process = subprocess.Popen(
        [kubellm(), "serve", str(default_model_path()), "--port", str(port), "--served-model-name", "m",
         "--max-model-len", "4096", "--num-kv-blocks", "300", "--device", "cpu",
         "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), *extra_args],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


@pytest.fixture
def serve_process():
    with serving() as running:
        yield running


def stream_events(url: str, body: dict, first_event: threading.Event, events: list) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                first_event.set()


def test_sigterm_drains_then_exits_zero(serve_process):
    process, url = serve_process
    # Thousands of tokens: far longer than the shutdown timeout on any CPU.
    long_body = {"model": "m", "prompt": "long", "max_tokens": 4000, "ignore_eos": True}
    long_started, long_events = threading.Event(), []
    long_client = threading.Thread(target=stream_events, args=(url, long_body, long_started, long_events))
    long_client.start()
    assert long_started.wait(60)

    [engine_core] = spawned_children(process.pid)
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{url}/ready").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    ready = httpx.get(f"{url}/ready")
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
    refused = httpx.post(f"{url}/v1/completions", json={"model": "m", "prompt": "new", "max_tokens": 2})
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert httpx.get(f"{url}/health").status_code == 200

    long_client.join(60)
    assert process.wait(60) == 0
    assert long_events[-1] == "[DONE]"
    finish_reasons = [c["finish_reason"] for e in long_events[:-1] for c in json.loads(e)["choices"]]
    assert finish_reasons[-1] == "abort"
    assert finish_reasons.count("abort") == 1 and all(r is None for r in finish_reasons[:-1])
    log = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    assert any(entry.get("finish_reasons") == ["abort"] for entry in log)
    with pytest.raises(ProcessLookupError):  # the engine core process exited with the server
        os.kill(engine_core, 0)


def stream_in_background(url: str) -> tuple[threading.Thread, list]:
    """A long stream (far longer than any test), once its first event arrived."""
    body = {"model": "m", "prompt": "long", "max_tokens": 4000, "ignore_eos": True}
    started, events = threading.Event(), []
    client = threading.Thread(target=stream_events, args=(url, body, started, events))
    client.start()
    assert started.wait(60)
    return client, events


def assert_ended_with_abort(events: list) -> None:
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"


def test_a_step_that_never_ends_does_not_keep_streams_open_past_the_timeout():
    """--shutdown-timeout 0 while the core is inside a step (stopped with SIGSTOP: the slowest step
    there is): the stream still ends with "abort" and [DONE], and the stuck core is killed."""
    with serving("--shutdown-timeout", "0") as (process, url):
        client, events = stream_in_background(url)
        [engine_core] = spawned_children(process.pid)
        os.kill(engine_core, signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        client.join(60)
        assert_ended_with_abort(events)
        assert process.wait(60) == 0
        assert "Traceback" not in process.stderr.read()
    with pytest.raises(ProcessLookupError):
        os.kill(engine_core, 0)


def test_a_second_signal_during_the_drain_aborts_and_exits_zero():
    """The first SIGTERM drains (for up to an hour here, while the core is stuck in a step); a second
    signal (here SIGINT, Ctrl-C's) ends the streams with "abort", kills the core and exits 0."""
    with serving("--shutdown-timeout", "3600") as (process, url):
        client, events = stream_in_background(url)
        [engine_core] = spawned_children(process.pid)
        os.kill(engine_core, signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        while httpx.get(f"{url}/ready").status_code == 200:  # the first signal was taken: draining
            time.sleep(0.01)
        assert client.is_alive() and events[-1] != "[DONE]"  # the drain waits for the stream
        process.send_signal(signal.SIGINT)
        client.join(60)
        assert_ended_with_abort(events)
        assert process.wait(60) == 0
        log = process.stderr.read()
        assert "Traceback" not in log and "received SIGINT again" in log
    with pytest.raises(ProcessLookupError):
        os.kill(engine_core, 0)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, whichever of their threads started them."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in map(int, (task / "children").read_text().split()):
            found |= {child} | _descendants(child)
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/PID/task/TID/children")
def test_sigterm_stops_a_tensor_parallel_server_and_its_workers():
    with serving("--tensor-parallel-size", "2") as (process, url):
        # the engine core process, its tensor-parallel worker, multiprocessing's resource trackers
        children = _descendants(process.pid)
        assert len(children) >= 2
        body = {"model": "m", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0, process.stderr.read()
    deadline = time.monotonic() + 30  # orphans are reaped by whoever adopts them
    while any(_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_running(pid) for pid in children)
