"""Prompt logprobs over HTTP (issue 16): completions echo with logprobs (what lm-evaluation-harness's
loglikelihood tasks send), vLLM's prompt_logprobs on completions and chat, top_logprobs / logprobs -1, and
bad_words; through the official openai client against a real server, checked against the offline engine."""

from __future__ import annotations

import httpx
import pytest

from engine.llm import LLM
from engine.sampling import SamplingParams
from server_harness import SERVED_NAME, engine_config, running_server

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def server():
    with running_server(engine_config(max_logprobs=-1)) as running:  # -1 allowed: the whole vocabulary
        yield running


@pytest.fixture(scope="module")
def offline():
    config = engine_config(max_logprobs=-1)
    return LLM(model=config.model, max_model_len=config.max_model_len, num_kv_blocks=config.num_kv_blocks,
               device="cpu", max_logprobs=-1)


@pytest.fixture(scope="module")
def tokenizer(offline):
    return offline.get_tokenizer()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": SERVED_NAME, **body}, timeout=60)


def scored(offline: LLM, prompt, top: int, max_tokens: int = 1):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=top, logprobs=top)
    return offline.generate([prompt], params, use_tqdm=False)[0]


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_reads_it(client, offline, tokenizer, max_tokens):
    """lm-evaluation-harness's loglikelihood: echo, logprobs, max_tokens 0 (or 1), token-id prompts."""
    expected = scored(offline, PROMPT, top=2)
    prompt_ids = expected.prompt_token_ids
    response = client.completions.create(model=SERVED_NAME, prompt=prompt_ids, echo=True, logprobs=2,
                                         max_tokens=max_tokens, temperature=0)
    choice = response.choices[0]
    generated = expected.outputs[0].token_ids[:max_tokens]
    tokens = prompt_ids + generated
    assert choice.text == tokenizer.decode(prompt_ids) + tokenizer.decode(generated)
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([t]) for t in tokens]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    entries = expected.prompt_logprobs[1:] + expected.outputs[0].logprobs[:max_tokens]
    for token, value, top, entry in zip(tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], entries):
        assert value == pytest.approx(entry[token], abs=1e-4)
        assert top == pytest.approx({tokenizer.decode([t]): lp for t, lp in entry.items()}, abs=1e-4)
        assert len(top) in (2, 3)  # the token itself, then the top 2
    offsets = [sum(len(tokenizer.decode([t])) for t in tokens[:i]) for i in range(len(tokens))]
    assert logprobs.text_offset == offsets
    assert choice.finish_reason == "length"


def test_a_streamed_echo_carries_the_prompt_logprobs_in_its_first_chunk(client):
    request = dict(model=SERVED_NAME, prompt=[PROMPT, "Hello"], echo=True, logprobs=1, max_tokens=4, temperature=0)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(**request, stream=True))
    for choice in whole.choices:
        parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(p.text for p in parts) == choice.text
        streamed = {key: sum((getattr(p.logprobs, key) for p in parts if p.logprobs), []) for key in
                    ("tokens", "token_logprobs", "text_offset")}
        # Equal up to float noise: the two requests' steps batch their sequences differently.
        assert streamed["tokens"] == choice.logprobs.tokens and streamed["text_offset"] == choice.logprobs.text_offset
        assert streamed["token_logprobs"][0] is None and choice.logprobs.token_logprobs[0] is None
        assert streamed["token_logprobs"][1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-4)
        assert parts[0].logprobs.token_logprobs[0] is None


def test_prompt_logprobs_on_completions_are_vllms_shape(server, offline, tokenizer):
    expected = scored(offline, PROMPT, top=3)
    response = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, "temperature": 0,
                                                "prompt_logprobs": 3})
    assert response.status_code == 200, response.text
    prompt_logprobs = response.json()["choices"][0]["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(expected.prompt_token_ids)
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        prompt_token = expected.prompt_token_ids[position]
        reference = expected.prompt_logprobs[position]
        assert {int(t) for t in entry} == set(reference)
        for token, logprob in entry.items():
            assert logprob["logprob"] == pytest.approx(reference[int(token)], abs=1e-4)
            assert logprob["decoded_token"] == tokenizer.decode([int(token)])
        assert entry[str(prompt_token)]["rank"] == expected.prompt_token_ranks[position]
        by_likelihood = sorted(entry.values(), key=lambda logprob: -logprob["logprob"])
        assert [logprob["rank"] for logprob in by_likelihood][:3] == [1, 2, 3]


def test_chat_prompt_logprobs_and_top_logprobs_minus_one_cover_the_vocabulary(client, offline):
    """vLLM's own server test (tests/entrypoints/openai, with --max-logprobs at the vocabulary size)."""
    vocab_size = offline.llm_engine.model_config.vocab_size
    messages = [{"role": "user", "content": "Beijing is the capital of which country?"}]
    plain = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=1)
    assert plain.prompt_logprobs is None  # present and null unless asked, as vLLM answers
    completion = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=1,
                                                extra_body={"prompt_logprobs": -1})
    prompt_logprobs = completion.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and all(len(entry) == vocab_size for entry in prompt_logprobs[1:])
    completion = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=1,
                                                extra_body={"top_logprobs": -1, "logprobs": "true"})
    assert len(completion.choices[0].logprobs.content[0].top_logprobs) == vocab_size
    # Completions key top_logprobs by token text, which several byte tokens share: ask for ids.
    response = client.completions.create(model=SERVED_NAME, prompt="Hi", max_tokens=1, logprobs=-1,
                                         extra_body={"return_tokens_as_token_ids": True})
    assert len(response.choices[0].logprobs.top_logprobs[0]) == vocab_size


@pytest.mark.parametrize("body", [
    {"prompt_logprobs": 1, "stream": True},
    {"prompt_logprobs": -2},
])
def test_invalid_prompt_logprobs_are_400_naming_the_field(server, body):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt_logprobs"


def test_bad_words_are_never_generated_and_match_the_offline_engine(client, offline, tokenizer):
    free = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    words = [tokenizer.decode(free.token_ids[4:6])]
    expected = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                                         bad_words=words), use_tqdm=False)[0].outputs[0]
    assert expected.token_ids != free.token_ids
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPT, max_tokens=16, temperature=0,
                                         extra_body={"bad_words": words, "ignore_eos": True, "return_token_ids": True})
    assert response.choices[0].text == expected.text
    assert response.choices[0].model_extra["token_ids"] == expected.token_ids


def test_blank_bad_words_are_400(server):
    response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                     "bad_words": ["  "]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "bad_words", response.text
