"""AsyncLLMEngine with the engine core in its own process: streams, bad requests, a dying core, draining."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal

import httpx
import pytest
import pytest_asyncio

from engine.async_engine import CORE_HANG_TIMEOUT_S, AsyncLLMEngine, QueueFullError
from engine.beam_search import BeamSearchParams
from engine.errors import EngineDeadError, InvalidRequestError, ModelLoadError
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.server.app import ServerSettings, ServerState, build_app
from server_harness import MAX_MODEL_LEN, engine_config

GREEDY = SamplingParams(temperature=0, max_tokens=6)
LONG = SamplingParams(max_tokens=1000, ignore_eos=True)
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    front = AsyncLLMEngine(engine_config())
    front.start()
    await front.wait_until_loaded()
    yield front
    front.stop()


async def final(engine: AsyncLLMEngine, request_id: str, prompt, params=GREEDY):
    outputs = [output async for output in engine.generate(request_id, prompt, params)]
    assert all(not o.finished for o in outputs[:-1]) and outputs[-1].finished
    return outputs[-1]


async def idle(engine: AsyncLLMEngine) -> None:
    """Until the core reports no running request (its stats arrive after every change)."""
    while engine.num_in_flight or engine.stats.num_running:
        await asyncio.sleep(0.01)


PROMPTS = ["Hello there", "The sky is", "abc abc abc"]


@pytest.fixture(scope="module")
def offline_texts():
    config = engine_config()
    llm = LLM(model=config.model, max_model_len=config.max_model_len, num_kv_blocks=config.num_kv_blocks, device="cpu")
    return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


async def test_streams_equal_the_offline_engine(engine, offline_texts):
    assert engine.client.core_pid not in (None, os.getpid())
    results = await asyncio.gather(*(final(engine, f"r{i}", p) for i, p in enumerate(PROMPTS)))
    assert [r.outputs[0].text for r in results] == offline_texts
    assert engine.num_in_flight == 0


async def test_the_in_process_core_streams_the_same(offline_texts):
    front = AsyncLLMEngine(engine_config(), in_process=True)
    front.start()
    try:
        await front.wait_until_loaded()
        assert front.client.core_pid is None
        results = await asyncio.gather(*(final(front, f"r{i}", p) for i, p in enumerate(PROMPTS)))
        assert [r.outputs[0].text for r in results] == offline_texts
    finally:
        front.stop()


async def test_a_bad_request_fails_alone_before_it_reaches_the_core(engine):
    good = asyncio.ensure_future(final(engine, "good", "Hello there", SamplingParams(temperature=0, max_tokens=20)))
    sent = engine.client.num_requests_sent
    with pytest.raises(InvalidRequestError) as raised:
        await final(engine, "too-long", list(range(5, 5 + MAX_MODEL_LEN)))
    assert raised.value.param == "prompt"
    assert engine.client.num_requests_sent == sent
    assert (await good).outputs[0].finish_reason == "length"
    assert engine.is_alive


async def test_leaving_a_stream_aborts_its_request_and_frees_its_blocks(engine):
    stream = engine.generate("left", "Hello", LONG)
    await anext(stream)
    await stream.aclose()
    await idle(engine)
    assert engine.stats.num_blocks_free == engine.stats.num_blocks_total and engine.stats.kv_cache_usage == 0


async def test_stop_strings_found_here_stop_the_core(engine):
    first = await final(engine, "probe", "Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    text = first.outputs[0].text
    stop = text[len(text) // 2:][:3]
    assert stop.strip(), f"the tiny model's text {text!r} has no usable stop string"
    before = engine.stats.generation_tokens_total
    stopped = await final(engine, "stopped", "Hello", SamplingParams(temperature=0, max_tokens=1000, stop=[stop],
                                                                     ignore_eos=True))
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    await idle(engine)
    assert engine.stats.generation_tokens_total - before < 100  # the core stopped too
    assert engine.stats.kv_cache_usage == 0


async def test_requests_on_their_way_to_the_core_count_as_waiting_and_bound_the_queue(engine):
    core = engine.client.core_pid
    engine.max_pending_requests = 1
    os.kill(core, signal.SIGSTOP)  # the core takes nothing in until SIGCONT
    try:
        first = asyncio.ensure_future(final(engine, "first", "Hello"))
        await asyncio.sleep(0.05)
        assert engine.num_unscheduled == 1 and engine.num_waiting == 1
        metrics = ServerState(engine, ServerSettings("m")).metrics.render().decode()
        assert 'kubellm_num_requests_waiting{model_name="m"} 1.0' in metrics
        with pytest.raises(QueueFullError):
            await final(engine, "second", "Hello")
        os.kill(core, signal.SIGCONT)
        assert (await first).finished
        assert engine.num_unscheduled == 0
    finally:
        os.kill(core, signal.SIGCONT)
        engine.max_pending_requests = None


async def test_a_silent_core_fails_health_until_it_speaks_again(engine):
    core = engine.client.core_pid
    engine.hang_timeout = 2.0  # an idle core sends a heartbeat every second
    app = build_app(engine, ServerSettings("m"))
    os.kill(core, signal.SIGSTOP)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            while engine.is_alive:
                await asyncio.sleep(0.05)
            assert "hung" in str(engine.error)
            health = await client.get("/health")
            assert health.status_code == 503 and "hung" in health.json()["error"]["message"]
            os.kill(core, signal.SIGCONT)
            while not engine.is_alive:
                await asyncio.sleep(0.05)
            assert (await client.get("/health")).status_code == 200
    finally:
        os.kill(core, signal.SIGCONT)
        engine.hang_timeout = CORE_HANG_TIMEOUT_S


async def test_abort_all_ends_a_beam_search_with_its_best_beams(engine):
    """Also between its steps, when none of its one-token requests is in flight."""
    sent = engine.client.num_requests_sent
    search = engine.beam_search("beams", "Hello", BeamSearchParams(beam_width=2, max_tokens=1000, ignore_eos=True))
    task = asyncio.ensure_future(anext(search))
    while engine.client.num_requests_sent < sent + 3:  # its first step (1 request) is done, the second (2) sent
        await asyncio.sleep(0.01)
    engine.abort_all()
    output = await task
    assert output.finished and [o.finish_reason for o in output.outputs] == ["abort", "abort"]
    assert all(0 < len(o.token_ids) < 1000 for o in output.outputs)
    assert engine.num_in_flight == 0


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
    await idle(engine)
    assert engine.stats.kv_cache_usage == 0


async def test_a_killed_core_fails_in_flight_requests_and_the_probes():
    front = AsyncLLMEngine(engine_config())
    front.start()
    try:
        await front.wait_until_loaded()
        app = build_app(front, ServerSettings("m"))
        victim = front.generate("victim", "Hello", LONG)
        await anext(victim)
        os.kill(front.client.core_pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="killed by SIGKILL"):
            async for _ in victim:
                pass
        assert not front.is_alive and front.num_in_flight == 0
        with pytest.raises(EngineDeadError):
            await final(front, "after", "Hello")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 503
            assert (await client.get("/ready")).status_code == 503
            response = await client.post("/v1/completions", json={"prompt": "hi"})
            assert response.status_code == 500 and response.json()["error"]["code"] == "engine_dead"
    finally:
        front.stop()


async def test_sigterm_to_the_core_stops_it_cleanly_and_fails_the_probes():
    front = AsyncLLMEngine(engine_config())
    front.start()
    try:
        await front.wait_until_loaded()
        os.kill(front.client.core_pid, signal.SIGTERM)
        while front.is_alive:
            await asyncio.sleep(0.05)
        assert str(front.error) == "the engine core process exited with code 0"
        with pytest.raises(EngineDeadError, match="code 0"):
            front.check_accepting()
    finally:
        front.stop()


async def test_a_model_that_fails_to_load_is_reported(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(engine_config().model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    front = AsyncLLMEngine(engine_config(folder))
    front.start()
    try:
        with pytest.raises(ModelLoadError, match="safetensors"):
            await front.wait_until_loaded()
        assert not front.is_alive and not front.is_ready
    finally:
        front.stop()


async def test_while_loading_the_server_is_alive_but_not_ready():
    front = AsyncLLMEngine(engine_config())
    front.start()
    os.kill(front.client.core_pid, signal.SIGSTOP)  # loading cannot finish before SIGCONT
    app = build_app(front, ServerSettings("m"))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
            refused = await client.post("/v1/completions", json={"prompt": "hi"})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            os.kill(front.client.core_pid, signal.SIGCONT)
            await front.wait_until_loaded()
            assert (await client.get("/ready")).status_code == 200
    finally:
        os.kill(front.client.core_pid, signal.SIGCONT)
        front.stop()
