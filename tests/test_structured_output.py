"""engine.structured_output on the real tokenizers of the test model families.

Each constraint is walked token by token the way the sampler will use it: fill
the bitmask, mask random logits, take the best allowed token, accept it, until
the matcher terminates (it accepts the stop token only once the output is
complete). Whatever the random logits, the text must satisfy the constraint.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from engine.errors import InvalidRequestError
from engine.sampling import StructuredOutputSpec
from engine.structured_output import (
    GrammarCompiler,
    RequestGrammar,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmask,
)
from engine.testing.tokenizer import CHAT_FORMATS, VOCAB_SIZE, write_tokenizer

MODEL_VOCAB = VOCAB_SIZE + 64  # models pad their embedding rows beyond the tokenizer's ids
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"enum": [1, 2, 3]},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "count", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module", params=sorted(CHAT_FORMATS))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_tokenizer(folder, request.param)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in CHAT_FORMATS[request.param].stop_tokens]
    return tokenizer, stop_ids, GrammarCompiler(tokenizer, MODEL_VOCAB, stop_ids, max_threads=1)


def walk(family, spec: StructuredOutputSpec, seed: int, max_steps: int = 600) -> str:
    """Text generated under the constraint from random logits; fails if the grammar never ends."""
    tokenizer, stop_ids, compiler = family
    grammar = RequestGrammar(compiler.compile(spec))
    bitmask = allocate_bitmask(1, MODEL_VOCAB)
    generator = torch.Generator().manual_seed(seed)
    token_ids: list[int] = []
    for _ in range(max_steps):
        assert fill_bitmask([grammar], bitmask) == []
        logits = torch.randn(1, MODEL_VOCAB, generator=generator)
        apply_bitmask(logits, bitmask)
        token = int(logits.argmax())
        assert grammar.accept(token)
        if grammar.is_terminated:
            assert token in stop_ids
            return tokenizer.decode(token_ids)
        token_ids.append(token)
    pytest.fail(f"the grammar did not finish in {max_steps} tokens: {tokenizer.decode(token_ids)!r}")


@pytest.mark.parametrize("seed", range(3))
def test_json_schema(family, seed):
    value = json.loads(walk(family, StructuredOutputSpec.json_schema(SCHEMA, "response_format"), seed))
    assert set(value) == {"answer", "count", "ok"}
    assert value["answer"] in ("yes", "no") and value["count"] in (1, 2, 3) and isinstance(value["ok"], bool)


@pytest.mark.parametrize("seed", range(3))
def test_compact_json_schema_has_no_free_whitespace(family, seed):
    text = walk(family, StructuredOutputSpec.json_schema(SCHEMA, "tool_choice", compact=True), seed)
    assert text == json.dumps(json.loads(text))  # one line, json.dumps' separators only
    assert set(json.loads(text)) == {"answer", "count", "ok"}


def test_json_object(family):
    assert isinstance(json.loads(walk(family, StructuredOutputSpec("json_object"), seed=0, max_steps=2000)), dict)


@pytest.mark.parametrize("seed", range(3))
def test_regex(family, seed):
    assert re.fullmatch(r"[a-c]{3}-\d{2}", walk(family, StructuredOutputSpec("regex", r"[a-c]{3}-\d{2}"), seed))


@pytest.mark.parametrize("seed", range(3))
def test_choice(family, seed):
    choices = ("yes", "no", 'say "maybe"\n')
    assert walk(family, StructuredOutputSpec("choice", choices), seed) in choices


def test_ebnf_grammar(family):
    grammar = 'root ::= "(" digit ("," digit)* ")"\ndigit ::= [0-9]'
    assert re.fullmatch(r"\(\d(,\d)*\)", walk(family, StructuredOutputSpec("grammar", grammar), seed=1))


@pytest.mark.parametrize(("spec", "fragment"), [
    (StructuredOutputSpec("json", '{"type": "objec"}', "response_format"), 'Unsupported type "objec"'),
    (StructuredOutputSpec("regex", "[a-", "structured_outputs"), "Unclosed '['"),
    (StructuredOutputSpec("grammar", "root ::= missing", "guided_grammar"), 'Rule "missing" is not defined'),
])
def test_invalid_constraints_raise_invalid_request_naming_the_field(family, spec, fragment):
    with pytest.raises(InvalidRequestError) as raised:
        family[2].compile(spec)
    assert raised.value.param == spec.param and fragment in raised.value.message
    assert not raised.value.message.startswith("[")  # xgrammar's source location is dropped


def test_schema_text_that_is_not_json_is_invalid():
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        StructuredOutputSpec.json_schema("{oops", "structured_outputs")


def test_a_batch_masks_only_its_constrained_rows(family):
    _, stop_ids, compiler = family
    grammar = RequestGrammar(compiler.compile(StructuredOutputSpec("choice", ("yes", "no"))))
    bitmask = allocate_bitmask(2, MODEL_VOCAB)
    assert fill_bitmask([None, grammar], bitmask) == []
    logits = torch.randn(2, MODEL_VOCAB)
    unconstrained = logits[0].clone()
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits[0], unconstrained)
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert 0 < len(allowed) < 10
    assert not set(allowed) & set(stop_ids)  # nothing generated yet: the output cannot end


@pytest.fixture(scope="module")
def llm(tiny_model_folder):
    from engine import LLM

    return LLM(model=str(tiny_model_folder("llama")), device="cpu", num_kv_blocks=256, max_model_len=512)


def constrained(llm, spec: StructuredOutputSpec, n: int = 4, **params) -> list:
    from engine import SamplingParams

    sampling = SamplingParams(temperature=1.0, seed=5, n=n, max_tokens=60, structured_output=spec, **params)
    unconstrained = SamplingParams(temperature=1.0, seed=6, max_tokens=8)
    outputs = llm.generate(["Answer:", "Another prompt, unconstrained"], [sampling, unconstrained], use_tqdm=False)
    return outputs[0].outputs


def test_the_engine_samples_only_what_the_grammar_allows(llm):
    choices = ("yes", "no", "maybe not")
    for completion in constrained(llm, StructuredOutputSpec("choice", choices)):
        assert completion.text in choices and completion.finish_reason == "stop"
    for completion in constrained(llm, StructuredOutputSpec("regex", r"[0-9]{3}-[a-z]{2}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", completion.text), completion.text
    for completion in constrained(llm, StructuredOutputSpec.json_schema(SCHEMA, "response_format"), n=2):
        value = json.loads(completion.text)
        assert value["answer"] in ("yes", "no") and value["count"] in (1, 2, 3)
    stats = llm.get_stats()
    assert stats.num_blocks_free == stats.num_blocks_total


def test_structured_outputs_are_the_same_whatever_the_batch(llm):
    from engine import SamplingParams

    spec = StructuredOutputSpec("regex", r"[a-z]{2,6}( [a-z]{2,6}){2}")
    params = SamplingParams(temperature=1.0, seed=9, max_tokens=40, structured_output=spec)
    alone = llm.generate("x", params, use_tqdm=False)[0].outputs[0].text
    others = [SamplingParams(temperature=0.8, seed=i, max_tokens=12) for i in range(5)]
    batch = llm.generate(["a", "b", "x", "c", "d", "e"], others[:2] + [params] + others[2:], use_tqdm=False)
    assert batch[2].outputs[0].text == alone and re.fullmatch(r"[a-z]{2,6}( [a-z]{2,6}){2}", alone)
