"""Every error class in OpenAI's shape, the API key, and a fuzz that finds no 500 and no hang.

One server for the module, with an API key and a short context (64 tokens) so
that fuzzed requests are either rejected or finish quickly.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_harness import SERVED_NAME, engine_config, running_server

API_KEY = "test-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 64


@pytest.fixture(scope="module")
def server():
    with running_server(engine_config(max_model_len=CONTEXT, num_kv_blocks=64), api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=30)


def post(server, path: str, body=None, content: bytes | None = None, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, content=content, headers=headers, timeout=30)


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# --- API key -----------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401_and_the_right_key_works(server, client):
    assert_error(post(server, "/completions", {"prompt": "hi"}, headers={}), 401)
    assert_error(post(server, "/completions", {"prompt": "hi"}, headers={"Authorization": "Bearer nope"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0).models.list()
    assert client.models.list().data[0].id == SERVED_NAME
    assert post(server, "/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_probes_and_metrics_need_no_key(server):
    for path in ("/health", "/ready", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path


# --- 400 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "n": "two"}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "stop": [""]}, "stop"),
        ({"prompt": "hi", "seed": 2**70}, "seed"),
        ({"prompt": "hi", "seed": 2**63}, "seed"),  # vLLM's range is int64; seed + n - 1 must fit a torch seed
        ({"prompt": "hi", "logprobs": 50}, "logprobs"),
        ({"prompt": "hi", "prompt_logprobs": 50}, "prompt_logprobs"),  # beyond --max-logprobs
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], []]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": [1, 2, 10**6]}, "prompt"),  # token id outside the vocabulary
        ({"prompt": list(range(3, 3 + CONTEXT))}, "prompt"),  # longer than the context
        ({"prompt": "hi", "max_tokens": CONTEXT * 2}, "max_tokens"),
    ],
)
def test_invalid_completion_parameters_are_400(server, body, param):
    assert_error(post(server, "/completions", body), 400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi " * CONTEXT}]}, "prompt"),
    ],
)
def test_invalid_chat_parameters_are_400(server, body, param):
    assert_error(post(server, "/chat/completions", body), 400, param)


@pytest.mark.parametrize(
    "extreme",
    [
        {"seed": -(2**63)}, {"seed": 2**63 - 1, "n": 2}, {"top_k": 10**6}, {"top_p": 1e-9}, {"min_p": 1.0},
        {"repetition_penalty": 2.0, "presence_penalty": -2.0, "frequency_penalty": 2.0}, {"temperature": 1e-6},
        {"temperature": 100.0}, {"stop": ["a"] * 16}, {"stop_token_ids": [0, 10**9]}, {"logprobs": 20},
    ],
)
def test_extreme_valid_values_are_served_and_harm_nobody(server, extreme):
    body = {"prompt": "edge", "max_tokens": 3, "temperature": 1.0, **extreme}
    response = post(server, "/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.engine.is_alive


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_malformed_json_is_400(server, content):
    response = post(server, "/completions", content=content, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(response, 400)


def test_openai_client_raises_bad_request_with_the_message(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=SERVED_NAME, prompt="hi", temperature=-3)
    assert raised.value.status_code == 400
    assert "temperature" in raised.value.body["message"]


# --- 404 / 405 ---------------------------------------------------------------------------------


def test_unknown_model_is_404(server, client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.body["code"] == "model_not_found"
    assert_error(post(server, "/completions", {"model": "nope", "prompt": "hi"}), 404, "model")


def test_unknown_route_and_wrong_method_use_the_error_shape(server):
    assert_error(httpx.get(f"{server.url}/v2/nothing"), 404)
    assert_error(httpx.get(f"{server.base_url}/completions", headers=AUTH), 405)


# --- fuzz --------------------------------------------------------------------------------------

# Small integers, so fuzzed n/max_tokens stay cheap; a few extreme values on top.
INTEGERS = st.integers(-3, 10) | st.sampled_from([CONTEXT + 1, 2**31, -(2**63) - 1, 2**64])
SCALARS = st.none() | st.booleans() | INTEGERS | st.floats(-5, 5) | st.text(max_size=8)
ANY_JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)
# Typed values: mostly valid, with the edges and just-outside values that validation must catch.
SAMPLING = {
    "model": st.just(SERVED_NAME),
    "max_tokens": st.integers(-1, 8),
    "temperature": st.floats(-0.5, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(-2, 600),
    "min_p": st.floats(0, 1),
    "n": st.integers(0, 3),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3),
    "seed": st.integers(-(2**64), 2**65),
    "presence_penalty": st.floats(-2.5, 2.5),
    "frequency_penalty": st.floats(-2.5, 2.5),
    "repetition_penalty": st.floats(0, 2.5),
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()},
                                            optional={"continuous_usage_stats": st.booleans()}),
    "user": st.text(max_size=5),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "truncate_prompt_tokens": st.integers(-2, 8),
    "return_token_ids": st.booleans(),
    "return_tokens_as_token_ids": st.booleans(),
    "logit_bias": st.just({}) | st.dictionaries(st.text(max_size=3), st.floats(-100, 100), max_size=2),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}]),
    "structured_outputs": st.fixed_dictionaries({}, optional={"regex": st.text(max_size=4),
                                                              "choice": st.lists(st.text(max_size=3), max_size=2)}),
}
COMPLETION_FIELDS = {**SAMPLING, "logprobs": st.integers(-1, 6), "echo": st.booleans(), "best_of": st.integers(-1, 4),
                     "use_beam_search": st.booleans(), "length_penalty": st.floats(-2, 2),
                     "early_stopping": st.sampled_from([True, False, "never"])}
PROMPT = (st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=3) | st.lists(st.integers(-2, 600), max_size=8)
          | st.lists(st.lists(st.integers(0, 511), max_size=4), max_size=2))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "user", "system", "assistant", "tool"])},
    optional={"content": st.text(max_size=20) | st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2)},
)
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.text(max_size=5)}, optional={"parameters": st.just({"type": "object"})})})
CHAT_FIELDS = {**SAMPLING, "max_completion_tokens": st.integers(-1, 8), "logprobs": st.booleans(),
               "top_logprobs": st.integers(-1, 25), "echo": st.booleans(), "add_generation_prompt": st.booleans(),
               "continue_final_message": st.booleans(), "tools": st.lists(TOOL, max_size=2),
               "tool_choice": st.sampled_from(["none", "auto", "required"])}


def bodies(required: dict, optional: dict) -> st.SearchStrategy[dict]:
    """Typed bodies, or the same fields holding arbitrary JSON (wrong types, nesting, extremes)."""

    def anything(fields: dict) -> dict:
        return {name: strategy | ANY_JSON for name, strategy in fields.items()}

    return (st.fixed_dictionaries(required, optional=optional)
            | st.fixed_dictionaries(anything(required), optional=anything(optional) | {"model": ANY_JSON}))


COMPLETION_BODY = bodies({"prompt": PROMPT}, COMPLETION_FIELDS)
CHAT_BODY = bodies({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}, CHAT_FIELDS)

FUZZ_SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_fuzzed_response(server, path: str, body: dict) -> None:
    """Any status but a 5xx other than 503; a complete, well-formed body; no hang (30 s timeout)."""
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, headers=AUTH, timeout=30) as response:
        raw = response.read().decode()
    assert response.status_code in (200, 400, 404, 503), (response.status_code, raw)
    if response.status_code != 200:
        assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
        assert events[-1] == "[DONE]", raw[-500:]
        assert all("error" not in json.loads(event) for event in events[:-1])
    else:
        assert json.loads(raw)["choices"]


@FUZZ_SETTINGS
@given(body=COMPLETION_BODY)
def test_fuzzed_completions_never_500_or_hang(server, body):
    check_fuzzed_response(server, "/completions", body)


@FUZZ_SETTINGS
@given(body=CHAT_BODY)
def test_fuzzed_chat_never_500_or_hang(server, body):
    check_fuzzed_response(server, "/chat/completions", body)


def test_server_is_healthy_after_the_fuzz(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert server.wait_until(lambda: server.engine.num_in_flight == 0)
    response = client.completions.create(model=SERVED_NAME, prompt="still here", max_tokens=3)
    assert response.usage.completion_tokens == 3
