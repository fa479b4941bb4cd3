"""The OpenAI API through the official `openai` client against a real uvicorn + real engine.

Greedy outputs must equal the offline LLM's on the same model folder, streamed
or not; concurrency, disconnects and metrics are checked on the same server.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import openai
import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.server.logs import JsonFormatter
from server_harness import SERVED_NAME

PROMPTS = ["Hello, my name is", "The capital of France is", "1 2 3 4", "kubernetes pods"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


def offline_text(offline: LLM, prompt, **params) -> str:
    return offline.generate([prompt], SamplingParams(temperature=0, **params), use_tqdm=False)[0].outputs[0].text


def stream_completion(client, **request) -> tuple[str, list]:
    chunks = list(client.completions.create(model=SERVED_NAME, stream=True, **request))
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    return text, chunks


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]


def test_health_ready_version(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    assert httpx.get(f"{server.url}/version").json()["version"]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_completion_equals_stream_equals_offline(client, offline, prompt):
    expected = offline_text(offline, prompt, max_tokens=12)
    response = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=12, temperature=0)
    streamed, chunks = stream_completion(client, prompt=prompt, max_tokens=12, temperature=0)
    assert response.choices[0].text == expected
    assert streamed == expected
    assert response.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    assert response.model == SERVED_NAME and response.created > 0


def test_usage_counts_with_include_usage(client, offline):
    prompt = PROMPTS[2]
    expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=7), use_tqdm=False)[0]
    _, chunks = stream_completion(client, prompt=prompt, max_tokens=7, temperature=0,
                                  stream_options={"include_usage": True})
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert usage_chunk.usage.completion_tokens == len(expected.outputs[0].token_ids) == 7
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 7
    response = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=7, temperature=0)
    assert response.usage == usage_chunk.usage


def test_chat_greedy_equals_stream_equals_offline(client, offline):
    expected = offline.chat(CHAT, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    response = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_completion_tokens=10,
                                              temperature=0)
    chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert response.choices[0].message.content == streamed == expected.outputs[0].text
    assert response.choices[0].message.role == "assistant"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert chunks[-1].usage.prompt_tokens == response.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens == 10


def test_chat_accepts_content_as_text_parts(client):
    as_string = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=6, temperature=0)
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    as_parts = client.chat.completions.create(model=SERVED_NAME, messages=parts, max_tokens=6, temperature=0)
    assert as_parts.choices[0].message.content == as_string.choices[0].message.content


def test_n2_gives_two_choices_streamed_and_not(client):
    request = dict(prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=7, n=2)
    response = client.completions.create(model=SERVED_NAME, **request)
    assert sorted(c.index for c in response.choices) == [0, 1]
    assert response.usage.completion_tokens == sum(1 for _ in range(2)) * 6
    streamed, chunks = stream_completion(client, **request)
    by_index = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            by_index[choice.index] += choice.text
    assert by_index == {c.index: c.text for c in response.choices}  # same seed, same samples


def test_multiple_prompts_and_token_id_prompts(client, offline):
    token_ids = offline.get_tokenizer()(PROMPTS[1])["input_ids"]
    response = client.completions.create(model=SERVED_NAME, prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=5,
                                         temperature=0)
    by_ids = client.completions.create(model=SERVED_NAME, prompt=token_ids, max_tokens=5, temperature=0)
    texts = {c.index: c.text for c in response.choices}
    assert texts == {0: offline_text(offline, PROMPTS[0], max_tokens=5), 1: offline_text(offline, PROMPTS[1],
                                                                                         max_tokens=5)}
    assert by_ids.choices[0].text == texts[1]
    batch = client.completions.create(model=SERVED_NAME, prompt=[token_ids, token_ids], max_tokens=5, temperature=0)
    assert [c.text for c in batch.choices] == [texts[1], texts[1]]


def test_completion_logprobs_match_offline(client, offline):
    expected = offline.generate([PROMPTS[3]], SamplingParams(temperature=0, max_tokens=5, logprobs=2),
                                use_tqdm=False)[0].outputs[0]
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[3], max_tokens=5, temperature=0,
                                         logprobs=2)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    wanted = [entry[token] for token, entry in zip(expected.token_ids, expected.logprobs)]
    assert logprobs.token_logprobs == pytest.approx(wanted, abs=1e-4)
    # Token strings key top_logprobs, so two ids that decode alike (e.g. partial UTF-8) share an entry.
    for top, entry in zip(logprobs.top_logprobs, expected.logprobs):
        best_two = sorted(entry.values(), reverse=True)[:2]
        assert 1 <= len(top) <= 2
        assert all(any(v == pytest.approx(b, abs=1e-4) for b in best_two) for v in top.values())
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]


def test_chat_logprobs_streamed_and_not(client):
    request = dict(model=SERVED_NAME, messages=CHAT, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    response = client.chat.completions.create(**request)
    content = response.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob <= 0 for entry in content)
    chunks = list(client.chat.completions.create(stream=True, **request))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_echo_prepends_the_prompt(client):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0,
                                         echo=True)
    plain = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert response.choices[0].text == PROMPTS[0] + plain.choices[0].text
    streamed, _ = stream_completion(client, prompt=PROMPTS[0], max_tokens=4, temperature=0, echo=True)
    assert streamed == response.choices[0].text


def test_stop_string_never_reaches_the_stream(client):
    full = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string in {full!r}"
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}, stop=[stop])
    streamed, chunks = stream_completion(client, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}, stop=[stop])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == streamed == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_streams_all_complete_correctly(server, offline):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    expected = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(temperature=0, max_tokens=8),
                                                            use_tqdm=False)]

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=8, temperature=0,
                                                 stream=True)
        text, finish_reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        return text, finish_reason

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    results = asyncio.run(all_of_them())
    assert [text for text, _ in results] == expected
    assert {reason for _, reason in results} == {"length"}


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    body = {"model": SERVED_NAME, "prompt": PROMPTS[0], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    before = server.engine.stats.generation_tokens_total
    with httpx.Client(timeout=60) as http, http.stream("POST", f"{server.base_url}/completions", json=body) as r:
        received = 0
        for line in r.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                assert server.metric("kubellm_num_requests_running") == 1
                break  # abandoning the iteration closes the connection
    # The connection closed while the request had most of its tokens to go.
    assert server.wait_until(lambda: server.engine.num_in_flight == 0 and server.engine.stats.num_running == 0)
    assert server.metric("kubellm_num_requests_running") == 0
    assert server.metric("kubellm_kv_cache_usage_ratio") == 0
    assert server.engine.stats.generation_tokens_total - before < 2000  # it did not run on to max_tokens


def test_non_streaming_disconnect_aborts(server):
    body = {"model": SERVED_NAME, "prompt": PROMPTS[1], "max_tokens": 2000, "ignore_eos": True}
    before = server.engine.stats.generation_tokens_total
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base_url}/completions", json=body, timeout=0.5)
    assert server.wait_until(lambda: server.engine.num_in_flight == 0 and server.engine.stats.num_running == 0)
    assert server.engine.stats.generation_tokens_total - before < 2000


def test_request_id_is_returned_and_logged(server, caplog):
    with caplog.at_level(logging.INFO, logger="kubellm.request"):
        response = httpx.post(f"{server.base_url}/completions", headers={"X-Request-Id": "my-trace-42"},
                              json={"model": SERVED_NAME, "prompt": "hi", "max_tokens": 3})
        generated = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "my-trace-42"
    assert generated
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "my-trace-42"]
    assert len(lines) == 1
    line = lines[0]
    assert line.prompt_tokens > 0 and line.output_tokens == 3 and line.finish_reasons == ["length"]
    assert line.ttft_s >= 0 and line.total_time_s >= line.ttft_s and line.queue_time_s >= 0
    assert line.status == 200 and line.outcome == "ok" and line.path == "/v1/completions"
    assert not [r for r in caplog.records if getattr(r, "path", None) == "/health"]  # probes are not logged
    assert json.loads(JsonFormatter().format(line))["request_id"] == "my-trace-42"


def test_rejected_requests_are_logged_too(server, caplog):
    with caplog.at_level(logging.INFO, logger="kubellm.request"):
        httpx.post(f"{server.base_url}/completions", headers={"X-Request-Id": "bad-one"},
                   json={"model": SERVED_NAME, "prompt": "hi", "temperature": -1})
        # The line is written once the response is sent, which may be just after the client has it.
        assert server.wait_until(lambda: any(getattr(r, "request_id", None) == "bad-one" for r in caplog.records))
    line = next(r for r in caplog.records if getattr(r, "request_id", None) == "bad-one")
    assert line.status == 400 and line.method == "POST"


METRICS = [
    "kubellm_num_requests_waiting", "kubellm_num_requests_running", "kubellm_kv_cache_usage_ratio",
    "kubellm_prefix_cache_queries_total", "kubellm_prefix_cache_hits_total", "kubellm_num_preemptions_total",
    "kubellm_prompt_tokens_total", "kubellm_generation_tokens_total", "kubellm_request_success_total",
    "kubellm_time_to_first_token_seconds_count", "kubellm_inter_token_latency_seconds_count",
    "kubellm_e2e_request_latency_seconds_count", "kubellm_request_queue_time_seconds_count",
]


def test_metrics_after_traffic(server, client):
    for prompt in PROMPTS:  # the same prompt twice: the second is a prefix-cache hit
        client.completions.create(model=SERVED_NAME, prompt=prompt * 8, max_tokens=4, temperature=0)
        client.completions.create(model=SERVED_NAME, prompt=prompt * 8, max_tokens=4, temperature=0)
    text = httpx.get(f"{server.url}/metrics").text
    for name in METRICS:
        assert f'{name}{{model_name="{SERVED_NAME}"' in text or f'{name}{{finish_reason' in text, name
    value = server.metric
    assert value("kubellm_num_requests_waiting") == 0 and value("kubellm_num_requests_running") == 0
    assert 0 <= value("kubellm_kv_cache_usage_ratio") <= 1
    assert value("kubellm_prefix_cache_hits_total") > 0
    assert value("kubellm_prefix_cache_queries_total") >= value("kubellm_prefix_cache_hits_total")
    assert value("kubellm_num_preemptions_total") >= 0
    assert value("kubellm_prompt_tokens_total") > 0
    assert value("kubellm_generation_tokens_total") >= 8 * 4
    assert value("kubellm_request_success_total") >= 8
    assert 'finish_reason="length"' in text
    successes = value("kubellm_request_success_total")
    assert value("kubellm_e2e_request_latency_seconds_count") == successes
    assert value("kubellm_time_to_first_token_seconds_count") >= successes
    assert value("kubellm_inter_token_latency_seconds_count") >= 8 * 3
    assert value("kubellm_request_queue_time_seconds_count") >= successes


def test_endpoint_picker_reads_the_vllm_names(server):
    """The Gateway API Inference Extension's picker scrapes vLLM's names; they parse and equal kubellm's gauges."""
    from prometheus_client.parser import text_string_to_metric_families

    from engine.server.metrics import VLLM_ALIASES

    families = {family.name: family for family in text_string_to_metric_families(
        httpx.get(f"{server.url}/metrics").text)}
    for own, alias in VLLM_ALIASES.items():
        assert families[alias].type == "gauge"
        samples = [(sample.labels, sample.value) for sample in families[alias].samples]
        assert samples == [(sample.labels, sample.value) for sample in families[own].samples]  # one scrape
        assert [labels for labels, _ in samples] == [{"model_name": SERVED_NAME}]
