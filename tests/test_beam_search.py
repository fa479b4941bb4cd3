"""LLM.beam_search equals transformers' generate(num_beams=...) on the same folder (fp32, CPU).

Random weights rarely emit a given EOS id, which would leave early stopping and
length penalties untested: the model folder's EOS ids are rewritten to tokens
the model actually prefers for these prompts, so hypotheses end at different
lengths and every early_stopping rule decides something.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM
from engine.beam_search import BeamSearch, BeamSearchParams
from engine.errors import InvalidRequestError

NEW_TOKENS = 10
PROMPT_LENGTHS = [3, 16, 17, 40]  # around a block boundary (block_size 16)


def random_prompts(vocab_size: int, seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def set_eos(folder, eos_ids: list[int]) -> None:
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        config = json.loads(path.read_text())
        config["eos_token_id"] = eos_ids if name == "generation_config.json" else eos_ids[0]
        path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def beam_model(tiny_model_folder, tmp_path_factory):
    """(folder, prompts): the tiny llama whose EOS ids are two of its favourite continuations."""
    folder = tmp_path_factory.mktemp("beam") / "llama"
    shutil.copytree(tiny_model_folder("llama"), folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = random_prompts(model.config.vocab_size)
    favourites = Counter()
    with torch.inference_mode():
        for prompt in prompts:
            model.generation_config.eos_token_id = None
            greedy = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                    num_beams=1)[0, len(prompt):].tolist()
            favourites.update(greedy[2:])
    set_eos(folder, [token for token, _ in favourites.most_common(2)])
    return folder, prompts


@pytest.fixture(scope="module")
def beam_llm(beam_model):
    folder, _ = beam_model
    return LLM(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=256)


@pytest.fixture(scope="module")
def hf(beam_model):
    folder, _ = beam_model
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


CASES = [  # beam width, length penalty, early stopping, ignore_eos
    (2, 1.0, False, False),
    (3, 1.0, True, False),
    (3, 2.0, "never", False),
    (4, -1.0, False, False),
    pytest.param(4, 1.0, "never", False, marks=pytest.mark.slow),
    pytest.param(2, 0.0, "never", False, marks=pytest.mark.slow),
    pytest.param(5, 0.5, True, False, marks=pytest.mark.slow),
    pytest.param(3, 1.0, False, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("width", "length_penalty", "early_stopping", "ignore_eos"), CASES)
def test_beam_search_matches_transformers(beam_model, beam_llm, hf, width, length_penalty, early_stopping, ignore_eos):
    _, prompts = beam_model
    params = BeamSearchParams(beam_width=width, max_tokens=NEW_TOKENS, length_penalty=length_penalty,
                              early_stopping=early_stopping, ignore_eos=ignore_eos)
    outputs = beam_llm.beam_search([{"prompt_token_ids": p} for p in prompts], params)
    eos = hf.generation_config.eos_token_id
    lengths = set()
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            expected = hf.generate(
                torch.tensor([prompt]), num_beams=width, num_return_sequences=width, max_new_tokens=NEW_TOKENS,
                do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                eos_token_id=None if ignore_eos else eos, pad_token_id=-1,
                return_dict_in_generate=True, output_scores=True,
            )
            assert len(output.sequences) == width
            for sequence, row, score in zip(output.sequences, expected.sequences.tolist(),
                                            expected.sequences_scores.tolist()):
                generated = sequence.tokens[len(prompt):]
                assert sequence.tokens[: len(prompt)] == prompt
                assert row[: len(sequence.tokens)] == sequence.tokens, f"prompt of {len(prompt)} tokens"
                assert all(token == -1 for token in row[len(sequence.tokens):])
                assert sequence.score == pytest.approx(score, abs=1e-4)
                assert sequence.finish_reason == ("stop" if generated[-1] in eos and not ignore_eos else "length")
                assert sequence.cum_logprob == pytest.approx(
                    sequence.score * len(generated) ** length_penalty, abs=1e-3)
                assert sequence.text == beam_llm.get_tokenizer().decode(sequence.tokens)
                lengths.add(len(generated))
    if not ignore_eos and length_penalty <= 1.0:  # (a larger one favours the longest hypotheses)
        assert len(lengths) > 1, "no hypothesis ended on an EOS id: the case tests nothing of early stopping"
    assert beam_llm.get_stats().num_blocks_free == 256


def test_beam_search_shares_prompt_blocks_through_the_prefix_cache(beam_model, beam_llm):
    """Every step after the first finds each beam's full blocks in the cache: only the tokens past
    the last full block are computed again."""
    _, prompts = beam_model
    stats = beam_llm.get_stats()
    beam_llm.beam_search([{"prompt_token_ids": prompts[-1]}],
                         BeamSearchParams(beam_width=4, max_tokens=NEW_TOKENS, ignore_eos=True))
    after = beam_llm.get_stats()
    queried = after.prefix_cache_queries - stats.prefix_cache_queries
    hits = after.prefix_cache_hits - stats.prefix_cache_hits
    # 1 + 4 * 9 requests of 40..49 tokens: at most 15 of each computed, at least 32 found in the cache.
    assert queried - hits <= 1 + 40 + 15 * 4 * (NEW_TOKENS - 1)
    assert hits >= 32 * 4 * (NEW_TOKENS - 1)


def test_beam_search_refuses_what_it_cannot_do(beam_llm):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        beam_llm.beam_search("hello", BeamSearchParams(beam_width=2, max_tokens=10**6))
    with pytest.raises(InvalidRequestError, match="beam width of at most 6"):
        beam_llm.beam_search("hello", BeamSearchParams(beam_width=7, max_tokens=4))
    with pytest.raises(InvalidRequestError, match="early_stopping"):
        BeamSearchParams(beam_width=2, max_tokens=4, early_stopping="sometimes")
    with pytest.raises(InvalidRequestError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)


def test_beam_search_takes_text_prompts(beam_llm):
    [output] = beam_llm.beam_search("hello there", BeamSearchParams(beam_width=2, max_tokens=3, ignore_eos=True))
    prompt = beam_llm.llm_engine.tokenize("hello there")
    assert [s.tokens[: len(prompt)] for s in output.sequences] == [prompt, prompt]
    assert output.sequences[0].score >= output.sequences[1].score


def test_abort_keeps_the_best_running_beams():
    search = BeamSearch([1, 2], BeamSearchParams(beam_width=2, max_tokens=5), frozenset({0}))
    search.advance([{7: -0.5, 8: -1.0, 9: -2.0, 0: -3.0, 5: -4.0, 6: -5.0}])
    assert search.pending() == [[1, 2, 7], [1, 2, 8]]
    search.abort()
    assert search.done and search.pending() == []
    assert [(s.tokens, s.finish_reason) for s in search.output().sequences] == [
        ([1, 2, 7], "abort"), ([1, 2, 8], "abort")]
