"""The server with its engine core in another process: aborts free every KV block; a killed core fails loudly.

The KV numbers are the ones the core process reports in its stats, so a
block still referenced over there after a client went away shows up here.
"""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import openai
import pytest

from server_harness import SERVED_NAME, running_server

LONG = {"max_tokens": 2000, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def server():
    with running_server() as running:
        yield running


def test_abandoned_requests_leave_no_kv_blocks_behind(server):
    async def abandon_stream(client: openai.AsyncOpenAI, prompt: str) -> None:
        stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, stream=True, n=2, **LONG)
        async for _ in stream:
            break
        await stream.close()

    async def abandon_request(prompt: str) -> None:
        with pytest.raises(httpx.TimeoutException):
            async with httpx.AsyncClient(timeout=0.5) as http:
                await http.post(f"{server.base_url}/completions",
                                json={"model": SERVED_NAME, "prompt": prompt, "max_tokens": 2000, "ignore_eos": True})

    async def all_of_them() -> None:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
            await asyncio.gather(*(abandon_stream(c, f"prompt {i} " * (i + 1)) for i in range(6)),
                                 *(abandon_request(f"other {i}") for i in range(2)))

    asyncio.run(all_of_them())
    engine = server.engine
    assert server.wait_until(lambda: engine.num_in_flight == 0 and engine.stats.num_running == 0
                             and engine.stats.num_waiting == 0)
    assert engine.stats.num_blocks_free == engine.stats.num_blocks_total
    assert server.metric("kubellm_kv_cache_usage_ratio") == 0


def test_a_core_killed_mid_stream_fails_the_stream_and_the_probes(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model=SERVED_NAME, prompt="Hello", stream=True, **LONG)
    chunks = iter(stream)
    next(chunks)
    os.kill(server.engine.client.core_pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="SIGKILL"):
        for _ in chunks:
            pass
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    assert httpx.get(f"{server.url}/ready").status_code == 503
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=SERVED_NAME, prompt="Hello", max_tokens=2)
