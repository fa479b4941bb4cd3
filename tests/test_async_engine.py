"""AsyncLLMEngine over the real LLMEngine: streams, isolation of bad requests, a dying step loop, draining."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest
import pytest_asyncio

from engine.async_engine import AsyncLLMEngine, QueueFullError
from engine.errors import EngineDeadError, InvalidRequestError, ModelLoadError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.server.app import ServerSettings, ServerState, build_app
from server_harness import MAX_MODEL_LEN, engine_config

GREEDY = SamplingParams(temperature=0, max_tokens=6)
pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def engine():
    front = AsyncLLMEngine(lambda: LLMEngine(engine_config()))
    front.start()
    await front.wait_until_loaded()
    yield front
    front.stop()


async def final(engine: AsyncLLMEngine, request_id: str, prompt, params=GREEDY):
    outputs = [output async for output in engine.generate(request_id, prompt, params)]
    assert all(not o.finished for o in outputs[:-1]) and outputs[-1].finished
    return outputs[-1]


async def test_streams_equal_the_offline_engine(engine):
    prompts = ["Hello there", "The sky is", "abc abc abc"]
    results = await asyncio.gather(*(final(engine, f"r{i}", p) for i, p in enumerate(prompts)))
    config = engine_config()
    offline = LLM(model=config.model, max_model_len=config.max_model_len, num_kv_blocks=config.num_kv_blocks,
                  device="cpu").generate(prompts, GREEDY, use_tqdm=False)
    assert [r.outputs[0].text for r in results] == [o.outputs[0].text for o in offline]
    assert engine.num_in_flight == 0


async def test_a_bad_request_fails_alone(engine):
    good = asyncio.ensure_future(final(engine, "good", "Hello there", SamplingParams(temperature=0, max_tokens=20)))
    with pytest.raises(InvalidRequestError) as raised:
        await final(engine, "too-long", list(range(5, 5 + MAX_MODEL_LEN)))
    assert raised.value.param == "prompt"
    assert (await good).outputs[0].finish_reason == "length"
    assert engine.is_alive


async def test_leaving_a_stream_aborts_its_request(engine):
    stream = engine.generate("left", "Hello", SamplingParams(max_tokens=1000, ignore_eos=True))
    await anext(stream)
    await stream.aclose()
    for _ in range(500):
        if engine.stats.num_running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0
    assert engine.num_in_flight == 0


def gated(llm_engine: LLMEngine, gate: threading.Event, entered: threading.Event) -> LLMEngine:
    """The engine, with step() held at `gate` so a test can act while a step is in progress."""
    step = llm_engine.step

    def held_step():
        entered.set()
        gate.wait(30)
        return step()

    llm_engine.step = held_step
    return llm_engine


async def test_requests_queued_in_the_front_end_count_as_waiting_and_bound_the_queue():
    gate, entered = threading.Event(), threading.Event()
    front = AsyncLLMEngine(lambda: gated(LLMEngine(engine_config()), gate, entered), max_pending_requests=1)
    front.start()
    await front.wait_until_loaded()
    try:
        first = asyncio.ensure_future(final(front, "first", "Hello"))
        await asyncio.to_thread(entered.wait, 30)  # the step thread is inside step() now
        second = asyncio.ensure_future(final(front, "second", "Hello"))
        await asyncio.sleep(0.05)
        assert front.num_unscheduled == 1 and front.num_waiting == 1
        metrics = ServerState(front, ServerSettings("m")).metrics.render().decode()
        assert 'kubellm_num_requests_waiting{model_name="m"} 1.0' in metrics
        with pytest.raises(QueueFullError):
            await final(front, "third", "Hello")
        gate.set()
        assert (await first).finished and (await second).finished
    finally:
        gate.set()
        front.stop()


async def test_a_dead_step_loop_fails_in_flight_requests_and_the_probes():
    llm_engine = LLMEngine(engine_config())
    front = AsyncLLMEngine(lambda: llm_engine)
    front.start()
    await front.wait_until_loaded()
    step = llm_engine.step
    calls = 0

    def dying_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return step()

    llm_engine.step = dying_step
    app = build_app(front, ServerSettings("m"))
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        await final(front, "victim", "Hello", SamplingParams(max_tokens=50, ignore_eos=True))
    assert not front.is_alive
    with pytest.raises(EngineDeadError):
        await final(front, "after", "Hello")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/ready")).status_code == 503
        response = await client.post("/v1/completions", json={"prompt": "hi"})
        assert response.status_code == 500 and response.json()["error"]["code"] == "engine_dead"


async def test_a_model_that_fails_to_load_is_reported():
    def broken():
        raise ModelLoadError("config.json is missing in /nowhere")

    front = AsyncLLMEngine(broken)
    front.start()
    with pytest.raises(ModelLoadError, match="config.json"):
        await front.wait_until_loaded()
    assert not front.is_alive and not front.is_ready


async def test_drain_lets_short_requests_finish_and_aborts_long_ones(engine):
    # Two tokens take milliseconds; 2000 take seconds: far apart on either side of the 1 s timeout.
    state = ServerState(engine, ServerSettings("m", shutdown_timeout=1.0))
    short = asyncio.ensure_future(final(engine, "short", "Hello", SamplingParams(max_tokens=2, ignore_eos=True)))
    long = asyncio.ensure_future(final(engine, "long", "Hello", SamplingParams(max_tokens=2000, ignore_eos=True)))
    await asyncio.sleep(0.05)
    await state.drain()
    assert (await short).outputs[0].finish_reason == "length"
    aborted = (await long).outputs[0]
    assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 2000
    assert engine.num_in_flight == 0
    assert engine.stats.num_running == 0


async def test_while_loading_the_server_is_alive_but_not_ready():
    loaded = threading.Event()

    def slow_load() -> LLMEngine:
        loaded.wait(30)
        return LLMEngine(engine_config())

    front = AsyncLLMEngine(slow_load)
    front.start()
    app = build_app(front, ServerSettings("m"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
            refused = await client.post("/v1/completions", json={"prompt": "hi"})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            loaded.set()
            await front.wait_until_loaded()
            assert (await client.get("/ready")).status_code == 200
    finally:
        loaded.set()
        front.stop()
