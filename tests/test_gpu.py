"""The engine's GPU path (Triton kernels, CUDA graphs) against transformers. GPU only.

The bf16 check is teacher-forced (benchmarks/gpu_correctness.py): random
weights make near-ties common, so bf16 rounding alone moves some top-1 tokens;
the engine must be as close to transformers' fp32 answer as transformers' own
bf16 forward is.
In fp32 the greedy outputs must be equal.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from engine.testing import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny") / "model", family="llama", size="tiny")


def greedy_token_ids(folder, prompts: list[list[int]], max_tokens: int, **engine_args) -> list[list[int]]:
    from engine import LLM, SamplingParams

    llm = LLM(model=str(folder), device="cuda", dtype="float32", gpu_memory_utilization=0.3, **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


PROMPTS = [[5, 17, 99, 3], [42] * 37, list(range(20, 90)), [7]]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_greedy_fp32_equals_transformers(tiny_folder, enforce_eager):
    from transformers import AutoModelForCausalLM

    ours = greedy_token_ids(tiny_folder, PROMPTS, 24, enforce_eager=enforce_eager)
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).cuda().eval()
    for prompt, tokens in zip(PROMPTS, ours):
        ids = torch.tensor([prompt], device="cuda")
        expected = model.generate(ids, do_sample=False, max_new_tokens=24, min_new_tokens=24, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()


def test_overlap_scheduling_gives_the_same_tokens_on_the_gpu(tiny_folder):
    """Greedy, seeded, penalised and stopped requests with CUDA graphs, preemption included."""
    from engine import LLM, SamplingParams

    mixed = [
        SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=20, n=2, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.2, frequency_penalty=0.3, max_tokens=15),
        SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[17, 42, 99], min_tokens=2, logprobs=3),
    ]
    prompts = [{"prompt_token_ids": list(range(3 + i, 40 + 7 * i))} for i in range(24)]
    params = [mixed[i % len(mixed)] for i in range(len(prompts))]

    def run(overlap: bool, num_kv_blocks: int | None) -> list:
        llm = LLM(model=str(tiny_folder), device="cuda", dtype="float32", gpu_memory_utilization=0.3,
                  overlap_scheduling=overlap, num_kv_blocks=num_kv_blocks, max_num_seqs=16)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.get_stats()
        assert stats.num_blocks_free == stats.num_blocks_total
        return [[(o.token_ids, o.finish_reason) for o in r.outputs] for r in outputs], stats.num_preemptions

    reference, _ = run(overlap=False, num_kv_blocks=None)
    assert run(overlap=True, num_kv_blocks=None)[0] == reference
    preempted, preemptions = run(overlap=True, num_kv_blocks=24)
    assert preempted == reference and preemptions > 0


def test_prompt_logprobs_and_bad_words_on_the_gpu_match_transformers(tiny_folder):
    """Chunked prefills with prompt logprobs, bad words read against the newest token on the device, CUDA
    graphs and overlap scheduling, in fp32."""
    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams
    from engine.bad_words import bad_words_token_ids

    llm = LLM(model=str(tiny_folder), device="cuda", dtype="float32", gpu_memory_utilization=0.3,
              max_num_batched_tokens=32, max_logprobs=-1)
    tokenizer = llm.get_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).cuda().eval()
    model.generation_config.eos_token_id = None
    for prompt in PROMPTS:
        free = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].token_ids
        words = [tokenizer.decode(free[4:6])]
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, prompt_logprobs=5, bad_words=words)
        output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            reference = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            expected = model.generate(ids, do_sample=False, max_new_tokens=16,
                                      bad_words_ids=bad_words_token_ids(tokenizer, words), pad_token_id=0)
        assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
        for j, entry in enumerate(output.prompt_logprobs[1:], start=1):
            for token_id, value in entry.items():
                assert value == pytest.approx(reference[j - 1, token_id].item(), abs=1e-3)


def test_teacher_forced_bf16_agrees_with_transformers(tmp_path):
    from benchmarks.gpu_correctness import compare
    from benchmarks.workloads import model_folder

    result = compare(model_folder("qwen2.5-0.5b", tmp_path), "bfloat16", num_prompts=4, prompt_len=256, chunk=48)
    # As close to the fp32 answer as transformers' own bf16 is (random weights: near-ties abound).
    floor = result["hf_same_dtype_top1_agreement_with_hf_fp32"]
    assert result["top1_agreement_with_hf_fp32"] >= floor - 0.02, result
    assert result["max_abs_logit_diff"] < 0.5, result


@pytest.mark.parametrize(("family", "size"), [("llama", "tiny"), ("mistral", "tiny-sliding-window"),
                                              ("qwen3_moe", "tiny"), ("gemma3", "tiny")])
def test_mixed_steps_replay_graphs_with_the_tokens_of_eager_steps(tmp_path, family, size):
    """Prompts join while others decode, chunked by a small token budget, so most steps carry prompt
    tokens and decode rows together. With graphs every step replays one (decode or padded mixed),
    none runs eagerly, and the greedy tokens are eager's; with a bound below the budget the larger
    steps run eagerly, still with the same tokens."""
    from engine import LLM, SamplingParams
    from engine.testing import make_model_folder

    folder = make_model_folder(tmp_path / "model", family=family, size=size)
    prompts = [{"prompt_token_ids": [(7 * i + 3 * j) % 200 + 5 for j in range(5 + (37 * i) % 90)]} for i in range(24)]
    params = [SamplingParams(temperature=0.0, max_tokens=6 + (i % 5) * 7, ignore_eos=True) for i in range(24)]

    def run(**engine_args) -> tuple[list[list[int]], object]:
        llm = LLM(model=str(folder), device="cuda", dtype="float32", gpu_memory_utilization=0.3, max_num_seqs=16,
                  max_num_batched_tokens=96, **engine_args)
        outputs = llm.generate(prompts, params, use_tqdm=False)
        counts = llm.llm_engine.core.model_runner.step_counts
        llm.llm_engine.shutdown()
        return [list(o.outputs[0].token_ids) for o in outputs], counts

    eager, eager_counts = run(enforce_eager=True)
    assert eager_counts.decode_graph == eager_counts.mixed_graph == 0 and eager_counts.eager > 0
    graphs, counts = run()
    assert graphs == eager
    assert counts.mixed_graph > 0 and counts.decode_graph > 0 and counts.eager == 0, counts
    bounded, bounded_counts = run(max_cudagraph_capture_size=48)
    assert bounded == eager
    assert bounded_counts.mixed_graph > 0 and bounded_counts.eager > 0, bounded_counts
