"""The engine's greedy tokens and logprobs equal Hugging Face transformers' on the same folder (fp32, CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams

PROMPT_LENGTHS = [1, 5, 16, 17, 64, 130, 300]  # block boundaries, several blocks, the longest asked for
NEW_TOKENS = 32


def random_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def hf_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos: compare every token
    return model.eval()


@pytest.mark.parametrize("family", [
    "llama", "qwen2", "mistral", "qwen3_moe", "gemma3",
    # Their layers are checked against transformers in test_models_vs_hf; end to end they add ~1 min each.
    pytest.param("qwen3", marks=pytest.mark.slow), pytest.param("mixtral", marks=pytest.mark.slow),
])
def test_greedy_tokens_and_logprobs_match_transformers(tiny_model_folder, family):
    path = tiny_model_folder(family)
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=256)
    prompts = random_prompts(llm.llm_engine.model_config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = hf_model(path)
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            completion = output.outputs[0]
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
            assert completion.token_ids == expected[0, len(prompt) :].tolist(), f"prompt of {len(prompt)} tokens"
            assert completion.finish_reason == "length"
            logits = model(torch.tensor([prompt + completion.token_ids])).logits[0, len(prompt) - 1 : -1]
            reference = torch.log_softmax(logits.float(), dim=-1)
            for step, entry in enumerate(completion.logprobs):
                assert len(entry) >= 5
                for token_id, value in entry.items():
                    assert value == pytest.approx(reference[step, token_id].item(), abs=1e-4)
    assert llm.get_stats().num_blocks_free == 256


def test_sliding_window_frees_blocks_behind_the_window_and_still_matches_transformers(tmp_path):
    """Mistral with an 8-token window: the engine keeps only the blocks the window reaches."""
    from engine.testing import make_model_folder

    path = make_model_folder(tmp_path / "model", "mistral", "tiny-sliding-window")
    llm = LLM(model=str(path), device="cpu", dtype="float32", num_kv_blocks=64, block_size=4,
              max_num_batched_tokens=32)
    core = llm.llm_engine.core
    assert core.scheduler.kv_window == 8
    prompts = random_prompts(llm.llm_engine.model_config.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts[-1:]], params, use_tqdm=False)
    model = hf_model(path)
    prompt = prompts[-1]
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert outputs[0].outputs[0].token_ids == expected[0, len(prompt):].tolist()
    # 332 tokens need 83 blocks of 4; with 64 blocks only freeing behind the window lets it run at all
    # (prefilled in chunks of 32, so at most 8 + 32 tokens are live at once).
    assert llm.get_stats().num_blocks_free == 64
