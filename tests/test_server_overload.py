"""503 with Retry-After when the queue is full or the server drains; the waiting gauge counts the queue.

The engine runs one sequence at a time (max_num_seqs=1) and the server admits one
waiting request (--max-pending-requests 1), so a long request plus a queued one
fill it deterministically.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from server_harness import SERVED_NAME, engine_config, running_server

LONG = {"model": SERVED_NAME, "prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server():
    with running_server(engine_config(max_num_seqs=1), max_pending_requests=1) as running:
        yield running


def hold_stream(server, stop: threading.Event) -> threading.Thread:
    """A client thread that streams LONG until `stop` is set, then disconnects."""

    def run() -> None:
        with httpx.stream("POST", f"{server.base_url}/completions", json=LONG, timeout=60) as response:
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def assert_503(response: httpx.Response, code: str) -> None:
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == code


def test_full_queue_is_503_with_retry_after_and_counts_as_waiting(server):
    stop = threading.Event()
    running, queued = hold_stream(server, stop), None
    try:
        assert server.wait_until(lambda: server.engine.stats.num_running == 1)
        queued = hold_stream(server, stop)
        assert server.wait_until(lambda: server.metric("kubellm_num_requests_waiting") == 1)
        assert_503(httpx.post(f"{server.base_url}/completions", json={"prompt": "hi", "max_tokens": 2}), "queue_full")
        with pytest.raises(openai.APIStatusError) as raised:
            openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0).completions.create(
                model=SERVED_NAME, prompt="hi", max_tokens=2)
        assert raised.value.status_code == 503
    finally:
        stop.set()
        for thread in (running, queued):
            if thread is not None:
                thread.join(30)
    assert server.wait_until(lambda: server.engine.num_in_flight == 0 and server.engine.stats.num_running == 0)
    assert httpx.post(f"{server.base_url}/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_draining_server_is_not_ready_and_refuses_new_requests(server):
    server.state.draining = True
    try:
        assert_503(httpx.get(f"{server.url}/ready"), "draining")
        assert_503(httpx.post(f"{server.base_url}/completions", json={"prompt": "hi"}), "draining")
        assert_503(httpx.post(f"{server.base_url}/chat/completions",
                              json={"messages": [{"role": "user", "content": "hi"}]}), "draining")
        assert httpx.get(f"{server.url}/health").status_code == 200  # alive: no restart while draining
    finally:
        server.state.draining = False
    assert httpx.get(f"{server.url}/ready").status_code == 200
