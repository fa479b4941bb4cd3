"""CPU decode speed on the built-in model: kubellm against transformers, same file, same machine.

Both load the same GGUF file (SmolLM2-135M-Instruct Q4_1 by default), dequantized
to each of `--dtypes` (float32 and bfloat16 by default), and decode greedily with
EOS ignored, so both produce exactly `--new-tokens` tokens. Decode rate excludes the prefill: each run is timed once
with 1 new token and once with N, and the rate is (N - 1) / (t_N - t_1).

- kubellm, 1 stream and `--streams` concurrent streams (aggregate tokens/s);
- transformers `generate`, 1 stream (its eager loop, the usual CPU baseline).

Each speed-up is given against transformers in the first dtype and in the same
dtype, so like is compared with like. All runs take turns (see decode_rates),
and the machine's load average is recorded.
Prefill is timed apart, on one `--prefill-len`-token prompt (time to the first token).

On a machine of many cores, pin it to the cores to compare on (torch sizes its
thread pool from the affinity mask); offline, the GGUF file of the built-in model:

    HF_HUB_OFFLINE=1 taskset -c 0,1 python -m benchmarks.cpu_decode --repeats 3 --out results/cpu_decode.json
"""

from __future__ import annotations

import argparse
import os
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


def decode_rates(runs: dict[str, Callable[[int], None]], new_tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """name -> (decode tokens/s of one run, prefill seconds), from the best of `repeats` of t_N and t_1.

    The systems take turns within each repeat, so a machine whose load drifts
    (a shared CI runner) slows them alike instead of whichever ran last.
    """
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            for slot, tokens in enumerate((1, new_tokens)):
                start = time.perf_counter()
                run(tokens)
                best[name][slot] = min(best[name][slot], time.perf_counter() - start)
    return {name: ((new_tokens - 1) / (t_n - t_1), t_1) for name, (t_1, t_n) in best.items()}


def prefill_seconds(runs: dict[str, Callable[[int], None]], repeats: int) -> dict[str, float]:
    """name -> best time of a run that generates one token (the prefill and one step), the systems taking turns."""
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(1)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


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


def decode_rows(rates: dict[str, tuple[float, float]], dtypes: list[str], streams: int) -> list[dict[str, object]]:
    """One row per system, dtype and stream count; speed-ups against transformers in float32 and in the same dtype."""
    rows = []
    for dtype in dtypes:
        same = rates[f"hf {dtype}"][0]
        for system, key, n in (("transformers generate", f"hf {dtype}", 1), ("kubellm", f"single {dtype}", 1),
                               ("kubellm", f"batched {dtype}", streams)):
            rate, first = rates[key]
            rows.append({"system": system, "dtype": dtype, "streams": n, "decode_tok_s": rate * n,
                         "vs_hf_fp32": rate * n / rates[f"hf {dtypes[0]}"][0], "vs_hf_same_dtype": rate * n / same,
                         "prefill_s": first if n == 1 else float("nan")})
    return rows


def prefill_rows(seconds: dict[str, float], dtypes: list[str], prompt_tokens: int) -> list[dict[str, object]]:
    """Time to the first token per system and dtype; speed-ups against transformers in float32 and in the same dtype."""
    return [
        {"system": system, "dtype": dtype, "prompt_tokens": prompt_tokens, "first_token_s": seconds[f"{key} {dtype}"],
         "vs_hf_fp32": seconds[f"hf {dtypes[0]}"] / seconds[f"{key} {dtype}"],
         "vs_hf_same_dtype": seconds[f"hf {dtype}"] / seconds[f"{key} {dtype}"]}
        for dtype in dtypes
        for system, key in (("transformers generate", "hf"), ("kubellm", "kubellm"))
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: the built-in model)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prefill-len", type=int, default=1024, help="prompt length of the prefill comparison")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated dtypes both systems run in; speed-ups are against the first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    file = Path(args.model) if args.model else builtin_model_path()
    dtypes = args.dtypes.split(",")

    from transformers import AutoModelForCausalLM

    max_model_len = max(args.prompt_len + args.new_tokens, args.prefill_len + 1) + 16
    runs, prefill_runs = {}, {}
    for dtype in dtypes:
        llm = LLM(model=str(file), dtype=dtype, device="cpu", max_model_len=max_model_len,
                  max_num_seqs=args.streams, enable_prefix_caching=False)
        tokenizer = llm.get_tokenizer()
        prompts = [prompt_ids(tokenizer, args.prompt_len, 7 * i) for i in range(args.streams)]
        long_prompt = prompt_ids(tokenizer, args.prefill_len, 3)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                     dtype=getattr(torch, dtype)).eval()
        runs |= {f"hf {dtype}": transformers_runner(model, prompts[0]),
                 f"single {dtype}": kubellm_runner(llm, prompts[:1]),
                 f"batched {dtype}": kubellm_runner(llm, prompts)}
        prefill_runs |= {f"hf {dtype}": transformers_runner(model, long_prompt),
                         f"kubellm {dtype}": kubellm_runner(llm, [long_prompt])}
    for run in runs.values():  # warm-up
        run(4)
    rates = decode_rates(runs, args.new_tokens, args.repeats)
    prefill = prefill_seconds(prefill_runs, args.repeats)
    rows = decode_rows(rates, dtypes, args.streams)
    prefills = prefill_rows(prefill, dtypes, args.prefill_len)
    env = environment() | {"threads": torch.get_num_threads(), "model": file.name, "load_average": os.getloadavg()}
    print(env)
    print_table(rows, f"CPU decode, {args.prompt_len}-token prompts, {args.new_tokens} new tokens (aggregate tok/s)")
    print_table(prefills,
                f"CPU prefill, one {args.prefill_len}-token prompt (time to the first token; vs_hf: speed-up)")
    save_json(args.out, {"environment": env, "args": vars(args), "rows": rows, "prefill_rows": prefills})


if __name__ == "__main__":
    main()
