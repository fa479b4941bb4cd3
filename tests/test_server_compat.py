"""OpenAI and vLLM request fields an ordinary client relies on, through the official client and raw HTTP.

Each test names the behaviour clients hit (issue 16): one choice per streamed
chunk, the tool role, logprobs=0, fields passed through to SamplingParams,
fields not implemented answered with a 400 that names them, vLLM's extras.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest
from starlette.testclient import TestClient

from engine.async_engine import AsyncLLMEngine
from engine.errors import ConfigError
from engine.generation_defaults import SamplingDefaults, load_sampling_defaults
from engine.llm import LLM
from engine.sampling import SamplingParams
from engine.server.app import ServerSettings, build_app
from engine.server.protocol import ChatCompletionRequest, CompletionRequest
from server_harness import SERVED_NAME

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
# Prompts whose greedy output (tiny test model) holds a special token / the letter "Z".
SPECIAL_TOKEN_PROMPT, SPECIAL_TOKEN = "Hello, my name is", "<|start_header_id|>"
STOP_PROMPT, STOP = "The capital of France is", "Z"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": SERVED_NAME, **body}, timeout=60)


def greedy(offline: LLM, prompt, **params):
    return offline.generate([prompt], SamplingParams(temperature=0, **params), use_tqdm=False)[0]


# --- (a) behaviour that breaks ordinary clients --------------------------------------------------


def test_n2_streams_one_choice_per_chunk(client):
    completion_chunks = list(client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=5, n=2, seed=3,
                                                       stream=True))
    chat_chunks = list(client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=5, n=2, seed=3,
                                                      stream=True))
    for chunks in (completion_chunks, chat_chunks):
        assert all(len(chunk.choices) == 1 for chunk in chunks)
        finishes = {chunk.choices[0].index: chunk.choices[0].finish_reason
                    for chunk in chunks if chunk.choices[0].finish_reason}
        assert finishes == {0: "length", 1: "length"}
    roles = [c.choices[0].index for c in chat_chunks if c.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1]


def test_tool_role_and_assistant_tool_calls_are_accepted(client):
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=3)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_logprobs_zero_returns_the_sampled_token(client):
    response = client.completions.create(model=SERVED_NAME, prompt="1 2 3", max_tokens=4, temperature=0, logprobs=0)
    logprobs = response.choices[0].logprobs
    assert [list(top) for top in logprobs.top_logprobs] == [[token] for token in logprobs.tokens]
    assert [next(iter(top.values())) for top in logprobs.top_logprobs] == logprobs.token_logprobs


def test_logit_bias_and_allowed_token_ids_steer_sampling(server):
    biased = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 6, "ignore_eos": True, "temperature": 1.0,
                                              "logit_bias": {"37": 100}, "return_token_ids": True}).json()
    assert biased["choices"][0]["token_ids"] == [37] * 6
    allowed = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 8, "ignore_eos": True, "temperature": 1.0,
                                               "allowed_token_ids": [40, 41, 42], "return_token_ids": True}).json()
    assert set(allowed["choices"][0]["token_ids"]) <= {40, 41, 42}
    for body, param in (({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                        ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"allowed_token_ids": [10**8]},
                                                                           "allowed_token_ids")):
        response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_stream_options_without_stream_is_400(server):
    response = post(server, "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


@pytest.mark.parametrize(("field", "value"), [
    ("priority", 1), ("spaces_between_special_tokens", False),
    ("suffix", "end"),
])
def test_fields_not_implemented_are_400_naming_them(server, field, value):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


@pytest.mark.parametrize(("field", "value"), [
    ("logit_bias", {}), ("use_beam_search", False), ("priority", 0), ("spaces_between_special_tokens", True),
    ("best_of", 1), ("prompt_logprobs", None),
])
def test_neutral_values_of_those_fields_are_fine(server, field, value):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    assert response.status_code == 200, response.text


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, offline):
    prompt = "The quick brown fox jumps over the lazy dog"
    token_ids = offline.get_tokenizer()(prompt)["input_ids"]
    response = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                         extra_body={"truncate_prompt_tokens": 4})
    assert response.usage.prompt_tokens == 4
    assert response.choices[0].text == greedy(offline, {"prompt_token_ids": token_ids[-4:]}, max_tokens=6).outputs[0].text


def test_skip_special_tokens_false_keeps_special_tokens(client, offline):
    request = dict(model=SERVED_NAME, prompt=SPECIAL_TOKEN_PROMPT, max_tokens=48, temperature=0,
                   extra_body={"ignore_eos": True})
    hidden = client.completions.create(**request).choices[0].text
    shown = client.completions.create(**{**request, "extra_body": {"ignore_eos": True, "skip_special_tokens": False}})
    assert SPECIAL_TOKEN not in hidden and SPECIAL_TOKEN in shown.choices[0].text
    offline_text = greedy(offline, SPECIAL_TOKEN_PROMPT, max_tokens=48, ignore_eos=True,
                          skip_special_tokens=False).outputs[0].text
    assert shown.choices[0].text == offline_text


def test_include_stop_str_in_output(client):
    request = dict(model=SERVED_NAME, prompt=STOP_PROMPT, max_tokens=20, temperature=0, stop=[STOP])
    cut = client.completions.create(**request).choices[0]
    kept = client.completions.create(**request, extra_body={"include_stop_str_in_output": True}).choices[0]
    assert cut.finish_reason == kept.finish_reason == "stop"
    assert kept.text == cut.text + STOP


# --- (b) vLLM extras -----------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(server, offline):
    text = "Kubernetes schedules pods"
    tokens = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert tokens["tokens"] == offline.get_tokenizer()(text)["input_ids"]
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == server.engine.limits.max_model_len
    detokenized = post(server, "/detokenize", {"tokens": tokens["tokens"]}).json()
    assert detokenized["prompt"].endswith(text)
    bad = post(server, "/detokenize", {"tokens": [10**7]})
    assert bad.status_code == 400 and "out of vocabulary" in bad.json()["error"]["message"]


def test_tokenize_messages_counts_what_chat_sends(server, client):
    counted = post(server, "/tokenize", {"messages": CHAT}).json()["count"]
    usage = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=1).usage
    assert counted == usage.prompt_tokens


def test_tokenizer_info(server):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["tokenizer_class"] and info["chat_template"] and info["eos_token"] == "<|end_of_text|>"


def test_return_token_ids_streamed_and_not(client, offline):
    expected = greedy(offline, "1 2 3 4", max_tokens=5)
    body = {"return_token_ids": True}
    response = client.completions.create(model=SERVED_NAME, prompt="1 2 3 4", max_tokens=5, temperature=0,
                                         extra_body=body).model_dump()
    choice = response["choices"][0]
    assert choice["prompt_token_ids"] == expected.prompt_token_ids
    assert choice["token_ids"] == expected.outputs[0].token_ids
    chunks = [c.model_dump() for c in client.completions.create(
        model=SERVED_NAME, prompt="1 2 3 4", max_tokens=5, temperature=0, stream=True, extra_body=body)]
    assert [c["choices"][0]["prompt_token_ids"] for c in chunks if c["choices"][0].get("prompt_token_ids")] == [
        expected.prompt_token_ids]
    assert sum((c["choices"][0]["token_ids"] for c in chunks), []) == expected.outputs[0].token_ids
    chat = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=3, extra_body=body).model_dump()
    assert len(chat["choices"][0]["token_ids"]) == chat["usage"]["completion_tokens"]
    assert len(chat["prompt_token_ids"]) == chat["usage"]["prompt_tokens"]


def test_continuous_usage_stats_on_every_chunk(client):
    chunks = list(client.completions.create(
        model=SERVED_NAME, prompt="1 2 3", max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert all(chunk.usage is not None for chunk in chunks)
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 4
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


def test_chat_logprobs_as_the_string_true(server):
    response = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "logprobs": "true",
                                                     "top_logprobs": 2})
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(entry["top_logprobs"]) == 2 for entry in content)


def test_return_tokens_as_token_ids(server):
    response = post(server, "/v1/completions", {"prompt": "1 2", "max_tokens": 3, "logprobs": 1,
                                                "return_tokens_as_token_ids": True, "return_token_ids": True})
    choice = response.json()["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]


@pytest.mark.parametrize("seed", [-(2**63), 2**63 - 1])
def test_64_bit_seeds_are_reproducible(client, seed):
    request = dict(model=SERVED_NAME, prompt="seed", max_tokens=4, temperature=1.0, n=2, seed=seed)
    first, second = (client.completions.create(**request) for _ in range(2))
    assert [c.text for c in first.choices] == [c.text for c in second.choices]


def test_out_of_vocabulary_and_empty_prompts_say_what_vllm_says(server):
    oov = post(server, "/v1/completions", {"prompt": [1, 999_999]})
    assert oov.status_code == 400 and oov.json()["error"]["message"] == "Token id 999999 is out of vocabulary"
    empty = post(server, "/v1/completions", {"prompt": "x", "truncate_prompt_tokens": 0})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "truncate_prompt_tokens"


def test_continue_final_message_with_echo(server, client):
    messages = [*CHAT, {"role": "assistant", "content": "Hello"}]
    body = {"add_generation_prompt": False, "continue_final_message": True}
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=3, temperature=0,
                                              extra_body={**body, "echo": True})
    assert response.choices[0].message.content.startswith("Hello")
    counted = post(server, "/tokenize", {"messages": messages, **body}).json()["count"]
    assert counted == response.usage.prompt_tokens
    with_turn = post(server, "/tokenize", {"messages": messages}).json()["count"]
    assert with_turn > counted  # the closed assistant turn and a new one are not in the continued prompt
    both = post(server, "/v1/chat/completions", {"messages": messages, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_root_path_serves_under_the_prefix_and_without_it():
    engine = AsyncLLMEngine(lambda: None)  # never started: /v1/models needs no model
    app = build_app(engine, ServerSettings(served_model_name=SERVED_NAME, root_path="/llm"))
    client = TestClient(app)
    for path in ("/llm/v1/models", "/v1/models"):
        response = client.get(path)
        assert response.status_code == 200 and response.json()["data"][0]["id"] == SERVED_NAME


# --- the model's sampling defaults (generation_config.json) ----------------------------------------


def test_generation_config_defaults_fill_only_unset_fields():
    defaults = SamplingDefaults({"temperature": 0.7, "top_p": 0.8, "top_k": 20}, max_tokens=33)
    chat = ChatCompletionRequest(messages=CHAT, top_p=0.5).to_sampling_params(defaults)
    assert (chat.temperature, chat.top_p, chat.top_k, chat.max_tokens) == (0.7, 0.5, 20, 33)
    completion = CompletionRequest(prompt="x", temperature=0).to_sampling_params(defaults)
    assert (completion.temperature, completion.max_tokens) == (0.0, 16)  # completions' own default max_tokens
    plain = ChatCompletionRequest(messages=CHAT).to_sampling_params(SamplingDefaults())
    assert (plain.temperature, plain.top_k, plain.max_tokens) == (1.0, -1, None)


def test_generation_config_sources(tmp_path):
    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir(), other.mkdir()
    (model / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 100}))
    (other / "generation_config.json").write_text(json.dumps({"top_k": 20, "repetition_penalty": 1.05}))
    assert load_sampling_defaults(str(model)) == SamplingDefaults({"temperature": 0.6, "top_p": 0.9}, 100)
    assert load_sampling_defaults(str(model), "vllm") == SamplingDefaults()
    assert load_sampling_defaults(str(model), str(other)) == SamplingDefaults({"top_k": 20, "repetition_penalty": 1.05})
    assert load_sampling_defaults(str(other / "missing")) == SamplingDefaults()  # auto: many models ship none
    with pytest.raises(ConfigError, match="does not exist"):
        load_sampling_defaults(str(model), str(tmp_path / "missing"))
    (other / "generation_config.json").write_text(json.dumps({"top_p": 7}))
    with pytest.raises(ConfigError, match="top_p"):
        load_sampling_defaults(str(model), str(other))


# --- structured outputs: an invalid constraint is a 400 at request time, a valid one is applied ----------

SCHEMA = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"], "additionalProperties": False}


@pytest.mark.parametrize(("path", "body", "param", "fragment"), [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objec"}}}}, "response_format", 'Unsupported type "objec"'),
    ("/v1/completions", {"structured_outputs": {"regex": "[a-"}}, "structured_outputs", "Unclosed '['"),
    ("/v1/completions", {"guided_grammar": "root ::= missing"}, "guided_grammar", "is not defined"),
    ("/v1/completions", {"guided_json": "{oops"}, "guided_json", "not valid JSON"),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ("/v1/completions", {"guided_regex": "a+", "structured_outputs": {"json_object": True}}, "structured_outputs",
     "only one"),
])
def test_structured_output_requests_are_400_naming_the_field(server, path, body, param, fragment):
    request = {"messages": CHAT} if path.endswith("chat/completions") else {"prompt": "hi"}
    response = post(server, path, {**request, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_valid_constraints_shape_the_output(client):
    """The constraints reach the sampler (the engine tests check JSON schemas end to end)."""
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=CHAT, max_tokens=20, temperature=1.0, seed=3,
        extra_body={"structured_outputs": {"regex": "(yes|no), [0-9]"}},
    )
    assert re.fullmatch("(yes|no), [0-9]", response.choices[0].message.content)
    assert response.choices[0].finish_reason == "stop"
    completion = client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=8, n=3, temperature=1.0,
                                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert {choice.text for choice in completion.choices} <= {"yes", "no"}


def test_response_format_text_is_plain_generation(client):
    response = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, max_tokens=2,
                                              response_format={"type": "text"})
    assert response.choices[0].finish_reason == "length"
