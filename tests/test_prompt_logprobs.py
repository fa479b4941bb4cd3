"""prompt_logprobs, logprobs -1 and bad_words offline: exact against transformers (fp32, CPU), through chunked
prefill, the prefix cache, preemption and overlap scheduling."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.bad_words import bad_words_token_ids
from engine.errors import InvalidRequestError

PROMPT_LENGTHS = [1, 2, 15, 16, 17, 40, 70]  # one token (nothing to score), block edges, several chunks


def random_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def hf_log_softmax(model, prompt: list[int]) -> torch.Tensor:
    """[len(prompt), vocab]: row j is the distribution of the token after prompt[: j + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def assert_prompt_logprobs_match(output, reference: torch.Tensor, top: int) -> None:
    prompt = output.prompt_token_ids
    assert len(output.prompt_logprobs) == len(prompt) and output.prompt_logprobs[0] is None
    assert output.prompt_token_ranks[0] is None
    for j in range(1, len(prompt)):
        entry, row = output.prompt_logprobs[j], reference[j - 1]
        assert next(iter(entry)) == prompt[j]  # the prompt token first
        expected_top = set(row.topk(top).indices.tolist())
        assert set(entry) - {prompt[j]} == expected_top or set(entry) == expected_top
        for token_id, value in entry.items():
            assert value == pytest.approx(row[token_id].item(), abs=1e-4)
        assert output.prompt_token_ranks[j] == int((row >= row[prompt[j]]).sum())


@pytest.fixture(scope="module")
def path(tiny_model_folder):
    return tiny_model_folder("llama")


@pytest.fixture(scope="module")
def hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_prompt_logprobs_match_transformers_through_chunked_prefill(tiny_model_folder, family):
    folder = tiny_model_folder(family)
    llm = LLM(model=str(folder), device="cpu", dtype="float32", num_kv_blocks=128, max_num_batched_tokens=24)
    prompts = random_prompts(llm.llm_engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.get_stats().num_chunked_prefills > 0
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        assert_prompt_logprobs_match(output, hf_log_softmax(model, prompt), top=4)
    assert llm.get_stats().num_blocks_free == 128


def test_a_cached_prefix_is_recomputed_for_prompt_logprobs_and_shared_otherwise(path, hf):
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=128)
    prompt = random_prompts(llm.llm_engine.model_config.vocab_size, seed=1)[-1]
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    first = llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)[0]
    scored = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0),
                          use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0  # a cached block has no logits
    assert_prompt_logprobs_match(scored, hf_log_softmax(hf, prompt), top=0)
    assert scored.outputs[0].token_ids == first.outputs[0].token_ids
    again = llm.generate({"prompt_token_ids": prompt}, plain, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.prompt_logprobs is None


def test_prompt_logprobs_survive_preemption_and_n_completions(path, hf):
    """Few blocks: prefills are preempted and recomputed; each prompt's logprobs still come once, whole."""
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=14, max_num_batched_tokens=32)
    prompts = random_prompts(llm.llm_engine.model_config.vocab_size, seed=2)[2:]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True, n=2, prompt_logprobs=2)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.get_stats().num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        assert len(output.outputs) == 2
        assert_prompt_logprobs_match(output, hf_log_softmax(hf, prompt), top=2)


def test_overlap_scheduling_on_and_off_give_the_same_prompt_logprobs_and_bad_word_bans(path):
    llm_on = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64, max_num_batched_tokens=32)
    llm_off = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64, max_num_batched_tokens=32,
                  overlap_scheduling=False)
    tokenizer = llm_on.get_tokenizer()
    prompts = random_prompts(llm_on.llm_engine.model_config.vocab_size, seed=3)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = llm_off.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    # Ban a two-token run each greedy output has: it must not come back, with overlap or without.
    words = [tokenizer.decode(o.outputs[0].token_ids[5:7]) for o in free]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, prompt_logprobs=1, logprobs=1,
                             bad_words=[word]) for word in words]
    results = []
    for llm in (llm_on, llm_off):
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results.append([(o.prompt_logprobs, o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs])
        assert llm.get_stats().num_blocks_free == 64
    on, off = results
    assert [r[1] for r in on] == [r[1] for r in off]
    for (prompt_on, _, sampled_on), (prompt_off, _, sampled_off) in zip(on, off):
        assert [e and list(e) for e in prompt_on] == [e and list(e) for e in prompt_off]
        assert [list(e) for e in sampled_on] == [list(e) for e in sampled_off]
    for word, (_, tokens, _) in zip(words, on):
        for banned in bad_words_token_ids(tokenizer, [word]):
            runs = [tokens[i : i + len(banned)] for i in range(len(tokens) - len(banned) + 1)]
            assert banned not in runs


def test_bad_words_match_transformers_bad_words_ids(path, hf):
    """Greedy with bad words equals transformers' generate with the same bad_words_ids."""
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64)
    tokenizer = llm.get_tokenizer()
    prompt = random_prompts(llm.llm_engine.model_config.vocab_size, seed=4)[4]
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    free = llm.generate({"prompt_token_ids": prompt}, greedy, use_tqdm=False)[0].outputs[0].token_ids
    words = [tokenizer.decode(free[3:5]), tokenizer.decode(free[9:10])]
    ids = bad_words_token_ids(tokenizer, words)
    banned = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                                       bad_words=words), use_tqdm=False)
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, bad_words_ids=ids)
    assert banned[0].outputs[0].token_ids == expected[0, len(prompt):].tolist() != free


def test_logprobs_minus_one_is_the_whole_vocabulary_when_the_engine_allows_it(path, hf):
    prompt = random_prompts(512, seed=5)[3]
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=-1, prompt_logprobs=-1)
    with pytest.raises(InvalidRequestError, match="greater than max allowed: 20"):
        LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=32).generate(
            {"prompt_token_ids": prompt}, params, use_tqdm=False)
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=32, max_logprobs=-1)
    vocab_size = llm.llm_engine.model_config.vocab_size
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert all(len(entry) == vocab_size for entry in output.outputs[0].logprobs)
    assert all(len(entry) == vocab_size for entry in output.prompt_logprobs[1:])
    assert_prompt_logprobs_match(output, hf_log_softmax(hf, prompt), top=vocab_size)
