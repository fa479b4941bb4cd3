"""Teacher-forced agreement of kubellm's GPU path with transformers on the same model folder.

Random prompts go through kubellm exactly as serving runs them: the first half
of each sequence as chunked prefill (Triton prefill kernel over the paged
cache), the rest one token per step for all sequences together (Triton decode
kernel); both replayed from the CUDA graphs unless eager. At every position the
logits are compared with transformers' (sdpa) forward over the whole sequence:
top-1 agreement and the largest absolute logit difference. Both are also
compared with transformers in fp32: random-weight models have many near-ties,
so bf16 rounding alone (transformers' own included) moves some top-1 tokens.

    python -m benchmarks.gpu_correctness --model llama-3.1-8b --out results/correctness.json
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import save_json
from benchmarks.workloads import MODEL_SHAPES, model_folder, token_id_limit
from engine.attention_metadata import AttentionMetadata
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine


def _metadata(lens: list[int], seq_lens: list[int], tables: list[list[int]],
              block_size: int, device: str) -> AttentionMetadata:
    slots = [t[p // block_size] * block_size + p % block_size
             for s, n, t in zip(seq_lens, lens, tables) for p in range(s - n, s)]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        max_query_len=max(lens),
        max_seq_len=max(seq_lens),
    )


@torch.inference_mode()
def kubellm_logits(engine: LLMEngine, prompts: list[list[int]], chunk: int) -> list[torch.Tensor]:
    """[len, vocab] float32 logits per prompt: chunked prefill of the first half, then batched decode."""
    runner = engine.core.model_runner
    model, block_size, device = runner.model, runner.block_size, runner.device
    blocks_each = -(-max(len(p) for p in prompts) // block_size)
    tables = [list(range(i * blocks_each, (i + 1) * blocks_each)) for i in range(len(prompts))]
    prefill_len = len(prompts[0]) // 2

    def forward(ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """From the CUDA graph that serves the step (decode or mixed), as the engine runs it; else eagerly."""
        hidden = runner.cuda_graphs.run(ids, positions, meta) if runner.cuda_graphs else None
        return model(ids, positions, meta) if hidden is None else hidden
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for start in range(0, prefill_len, chunk):  # every sequence's chunk in one mixed step
        end = min(start + chunk, prefill_len)
        ids = torch.tensor([t for p in prompts for t in p[start:end]], device=device)
        positions = torch.arange(start, end, device=device).repeat(len(prompts))
        meta = _metadata([end - start] * len(prompts), [end] * len(prompts),
                         tables, block_size, device)
        out = model.compute_logits(forward(ids, positions, meta)).view(len(prompts), end - start, -1)
        for i in range(len(prompts)):
            logits[i].append(out[i])
    for pos in range(prefill_len, len(prompts[0])):
        ids = torch.tensor([p[pos] for p in prompts], device=device)
        positions = torch.full((len(prompts),), pos, device=device)
        meta = _metadata([1] * len(prompts), [pos + 1] * len(prompts),
                         tables, block_size, device)
        out = model.compute_logits(forward(ids, positions, meta))
        for i in range(len(prompts)):
            logits[i].append(out[i : i + 1])
    return [torch.cat(parts) for parts in logits]


@torch.inference_mode()
def hf_logits(folder: Path, dtype: torch.dtype, prompts: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    ids = torch.tensor(prompts, device="cuda")
    out = [model(ids[i : i + 1]).logits[0].float() for i in range(len(prompts))]
    del model
    torch.cuda.empty_cache()
    return out


def compare(folder: Path, dtype: str, num_prompts: int, prompt_len: int, chunk: int,
            enforce_eager: bool = False, seed: int = 0) -> dict:
    engine = LLMEngine(EngineConfig(model=str(folder), dtype=dtype, seed=0, enforce_eager=enforce_eager,
                                    max_num_seqs=max(num_prompts, 8), max_model_len=prompt_len + 16,
                                    gpu_memory_utilization=0.45, enable_prefix_caching=False))
    rng = random.Random(seed)
    vocab = token_id_limit(folder)
    prompts = [[rng.randrange(10, vocab) for _ in range(prompt_len)] for _ in range(num_prompts)]
    ours = kubellm_logits(engine, prompts, chunk)
    torch_dtype = engine.config.torch_dtype
    del engine
    torch.cuda.empty_cache()
    ours_all = torch.cat(ours)
    theirs_all = torch.cat(hf_logits(folder, torch_dtype, prompts))
    exact = torch.cat(hf_logits(folder, torch.float32, prompts))  # the rounding-free answer

    def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a.argmax(-1) == b.argmax(-1)).float().mean().item()

    return {"positions": ours_all.shape[0], "top1_agreement": agreement(ours_all, theirs_all),
            "max_abs_logit_diff": (ours_all - theirs_all).abs().max().item(),
            "mean_abs_logit_diff": (ours_all - theirs_all).abs().mean().item(),
            # The noise floor: how often each side's rounding alone moves the top-1 of the fp32 answer.
            "top1_agreement_with_hf_fp32": agreement(ours_all, exact),
            "hf_same_dtype_top1_agreement_with_hf_fp32": agreement(theirs_all, exact),
            "logit_std": theirs_all.std().item(), "dtype": dtype, "prompt_len": prompt_len,
            "num_prompts": num_prompts, "chunk": chunk, "cuda_graphs": not enforce_eager}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=96)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = compare(model_folder(args.model, args.model_root), args.dtype, args.num_prompts, args.prompt_len,
                     args.chunk, args.enforce_eager)
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    save_json(args.out, {"model": args.model, "command": " ".join(sys.argv), **result})


if __name__ == "__main__":
    main()
