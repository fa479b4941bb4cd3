"""use_beam_search and best_of through the official openai client against a real server.

The served results must equal the offline engine's on the same model:
LLM.beam_search (itself checked against transformers in test_beam_search.py)
and seeded sampling ranked by cumulative logprob.
"""

from __future__ import annotations

import httpx
import pytest

from engine.beam_search import BeamSearchParams
from engine.sampling import SamplingParams
from server_harness import SERVED_NAME

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a colour."}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": SERVED_NAME, **body}, timeout=60)


def offline_beams(offline, prompt: str, **params) -> list[list[int]]:
    """The generated token ids of each hypothesis, best first."""
    [output] = offline.beam_search(prompt, BeamSearchParams(**params))
    prompt_length = len(offline.llm_engine.tokenize(prompt))
    return [sequence.tokens[prompt_length:] for sequence in output.sequences]


@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(1.0, False), (0.5, True), (2.0, "never")])
def test_completions_beam_search_equals_offline(client, offline, length_penalty, early_stopping):
    response = client.completions.create(
        model=SERVED_NAME, prompt=PROMPT, n=3, max_tokens=6, temperature=0.7,
        extra_body={"use_beam_search": True, "length_penalty": length_penalty, "early_stopping": early_stopping,
                    "return_token_ids": True},
    )
    expected = offline_beams(offline, PROMPT, beam_width=3, max_tokens=6, length_penalty=length_penalty,
                             early_stopping=early_stopping)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert [choice.token_ids for choice in response.choices] == expected
    tokenizer = offline.get_tokenizer()
    for choice, token_ids in zip(response.choices, expected):
        assert choice.finish_reason in ("stop", "length")
        text_ids = token_ids[:-1] if choice.finish_reason == "stop" else token_ids
        assert choice.text == tokenizer.decode(text_ids, skip_special_tokens=True)
    assert response.usage.completion_tokens == sum(len(ids) for ids in expected)


def test_chat_beam_search_streams_the_same_choices_as_a_whole_response(client, offline):
    request = dict(model=SERVED_NAME, messages=CHAT, n=2, max_tokens=5,
                   extra_body={"use_beam_search": True, "ignore_eos": True})
    whole = client.chat.completions.create(**request)
    texts, finish_reasons = {}, {}
    for chunk in client.chat.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finish_reasons[choice.index] = choice.finish_reason
    assert texts == {choice.index: choice.message.content for choice in whole.choices}
    assert finish_reasons == {0: "length", 1: "length"}
    prompt = offline.llm_engine.apply_chat_template(CHAT)
    expected = offline_beams(offline, prompt, beam_width=2, max_tokens=5, ignore_eos=True)
    tokenizer = offline.get_tokenizer()
    assert [choice.message.content for choice in whole.choices] == [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in expected]


@pytest.mark.parametrize(("body", "param"), [
    ({"stop": ["."]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"repetition_penalty": 1.3}, "repetition_penalty"),
    ({"structured_outputs": {"regex": "[a-z]+"}}, "structured_outputs"),
    ({"best_of": 4}, "best_of"),
    ({"n": 8}, "beam_width"),  # the tiny model has two EOS ids: 3 * 8 candidates is more than 20 logprobs
])
def test_beam_search_refuses_fields_it_cannot_honour(server, body, param):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "use_beam_search": True, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_beam_search_takes_a_neutral_response_format(client):
    response = client.chat.completions.create(model=SERVED_NAME, messages=CHAT, n=2, max_tokens=2,
                                              response_format={"type": "text"}, extra_body={"use_beam_search": True})
    assert len(response.choices) == 2


@pytest.mark.parametrize(("body", "param"), [
    ({"length_penalty": 0.5}, "length_penalty"), ({"early_stopping": True}, "early_stopping"),
    ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
])
def test_beam_search_fields_without_beam_search_are_400(server, body, param):
    response = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert param in response.text


def test_best_of_returns_the_n_most_likely_of_its_candidates(client, offline):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPT, n=2, best_of=5, max_tokens=6,
                                         temperature=1.0, seed=11)
    [candidates] = offline.generate([PROMPT], SamplingParams(n=5, max_tokens=6, temperature=1.0, seed=11, logprobs=0),
                                    use_tqdm=False)
    ranked = sorted(candidates.outputs, key=lambda output: -output.cumulative_logprob)
    assert len({output.text for output in ranked}) > 2, "the candidates are alike: the ranking tests nothing"
    assert [choice.text for choice in response.choices] == [output.text for output in ranked[:2]]
    assert [choice.index for choice in response.choices] == [0, 1]
    assert all(choice.logprobs is None for choice in response.choices)  # not asked for
    assert response.usage.completion_tokens == sum(len(output.token_ids) for output in ranked[:2])


def test_best_of_with_logprobs_reports_them_for_the_chosen(client):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPT, n=1, best_of=3, max_tokens=4,
                                         temperature=1.0, seed=5, logprobs=2)
    [choice] = response.choices
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs) == 4


@pytest.mark.parametrize(("body", "message"), [
    ({"n": 1, "best_of": 3, "stream": True}, "streamed"),
    ({"n": 3, "best_of": 2}, "at least n"),
])
def test_best_of_refusals(server, body, message):
    response = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "best_of" and message in error["message"]
