"""CPU decode speed on the built-in model: kubellm against transformers, same file, same machine.

Both load the same GGUF file (SmolLM2-135M-Instruct Q4_1 by default), dequantized
to float32, and decode greedily with EOS ignored, so both produce exactly
`--new-tokens` tokens. Decode rate excludes the prefill: each run is timed once
with 1 new token and once with N, and the rate is (N - 1) / (t_N - t_1).

- kubellm, 1 stream and `--streams` concurrent streams (aggregate tokens/s);
- transformers `generate`, 1 stream (its eager loop, the usual CPU baseline).

    python -m benchmarks.cpu_decode --out results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, save_json
from engine import LLM, SamplingParams
from engine.builtin_model import builtin_model_path

TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type changed how "
    "books were made, how ideas travelled between cities, and who could afford to read them. "
)


def prompt_ids(tokenizer, length: int, offset: int) -> list[int]:
    """`length` tokens of English text, different per stream (offset) so no prefix is shared."""
    ids = tokenizer(TEXT * (length // 10 + 2))["input_ids"]
    return ids[offset: offset + length]


def decode_rate(run: Callable[[int], None], new_tokens: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s per stream-run, prefill seconds): best of `repeats` of t_N - t_1."""
    best_n = best_1 = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(1)
        best_1 = min(best_1, time.perf_counter() - start)
        start = time.perf_counter()
        run(new_tokens)
        best_n = min(best_n, time.perf_counter() - start)
    return (new_tokens - 1) / (best_n - best_1), best_1


def kubellm_runner(llm: LLM, prompts: list[list[int]]) -> Callable[[int], None]:
    def run(new_tokens: int) -> None:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)

    return run


def transformers_runner(model, prompt: list[int]) -> Callable[[int], None]:
    ids = torch.tensor([prompt])

    def run(new_tokens: int) -> None:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        assert out.shape[1] == len(prompt) + new_tokens

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the built-in model)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    file = Path(args.model) if args.model else builtin_model_path()

    llm = LLM(model=str(file), dtype="float32", device="cpu", max_model_len=args.prompt_len + args.new_tokens + 16,
              max_num_seqs=args.streams, enable_prefix_caching=False)
    tokenizer = llm.get_tokenizer()
    prompts = [prompt_ids(tokenizer, args.prompt_len, 7 * i) for i in range(args.streams)]
    kubellm_runner(llm, prompts[:1])(4)  # warm-up
    single, single_prefill = decode_rate(kubellm_runner(llm, prompts[:1]), args.new_tokens, args.repeats)
    batched, _ = decode_rate(kubellm_runner(llm, prompts), args.new_tokens, args.repeats)
    del llm

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()
    transformers_runner(model, prompts[0])(4)
    reference, reference_prefill = decode_rate(transformers_runner(model, prompts[0]), args.new_tokens, args.repeats)

    rows = [
        {"system": "transformers generate", "streams": 1, "decode_tok_s": reference, "vs_hf_single": 1.0,
         "prefill_s": reference_prefill},
        {"system": "kubellm", "streams": 1, "decode_tok_s": single, "vs_hf_single": single / reference,
         "prefill_s": single_prefill},
        {"system": "kubellm", "streams": args.streams, "decode_tok_s": batched * args.streams,
         "vs_hf_single": batched * args.streams / reference, "prefill_s": float("nan")},
    ]
    env = environment() | {"threads": torch.get_num_threads(), "model": file.name}
    print(env)
    print_table(rows, f"CPU decode, {args.prompt_len}-token prompts, {args.new_tokens} new tokens (aggregate tok/s)")
    save_json(args.out, {"environment": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
