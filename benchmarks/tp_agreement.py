"""Agreement of tensor-parallel kubellm with tp=1 on the same model folder (bf16 on GPU).

Each size runs in its own process (so GPU memory is freed between them) and
decodes the same random prompts greedily, all in one continuous batch, with
CUDA graphs as served. In bf16 the all-reduce adds the ranks' partial sums in
another order than one GPU's matmul, so the greedy paths of a random-weight
model (many near-ties) may part. Reported per size: the share of sequences
identical to tp=1's, the mean tokens before the first difference, the largest
difference between the two runs' logprobs of the same chosen tokens before it,
and at each first difference the gap between the two candidate tokens in
tp=1's own logprobs (a small gap means a near-tie, not a wrong result).

    python -m benchmarks.tp_agreement --model llama-3.1-8b --sizes 2,4 --out results/tp_agreement.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import print_table, save_json
from benchmarks.workloads import MODEL_SHAPES, model_folder, token_id_limit

TOP_LOGPROBS = 5


def generate(args: argparse.Namespace, tp: int) -> list[dict]:
    """Token ids and {token: logprob} per position of every prompt (run in a child process)."""
    from engine import LLM, SamplingParams

    folder = model_folder(args.model, args.model_root)
    rng = random.Random(0)
    vocab = token_id_limit(folder)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(16, args.max_prompt_len))]
               for _ in range(args.num_prompts)]
    llm = LLM(model=str(folder), dtype=args.dtype, tensor_parallel_size=tp, max_num_seqs=args.num_prompts,
              max_model_len=args.max_prompt_len + args.new_tokens, enforce_eager=args.enforce_eager)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.llm_engine.shutdown()
    return [{"tokens": o.outputs[0].token_ids,
             "logprobs": [{str(t): lp for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in outputs]


def compare(reference: list[dict], other: list[dict]) -> dict:
    prefix_lengths, max_logprob_diff, gaps = [], 0.0, []
    for ref, oth in zip(reference, other):
        same = next((i for i, (a, b) in enumerate(zip(ref["tokens"], oth["tokens"])) if a != b), len(ref["tokens"]))
        prefix_lengths.append(same)
        for i in range(same):
            token = str(ref["tokens"][i])
            max_logprob_diff = max(max_logprob_diff, abs(ref["logprobs"][i][token] - oth["logprobs"][i][token]))
        if same < len(ref["tokens"]):
            candidates = ref["logprobs"][same]
            theirs = candidates.get(str(oth["tokens"][same]))
            gaps.append(None if theirs is None else candidates[str(ref["tokens"][same])] - theirs)
    known_gaps = [g for g in gaps if g is not None]
    return {
        "identical_sequences": sum(n == len(r["tokens"]) for n, r in zip(prefix_lengths, reference)) / len(reference),
        "mean_tokens_before_first_difference": statistics.mean(prefix_lengths),
        "max_logprob_diff_before_it": max_logprob_diff,
        "first_differences": len(gaps),
        "max_tp1_logprob_gap_at_them": max(known_gaps) if known_gaps else None,
        "outside_tp1_top5": len(gaps) - len(known_gaps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sizes", default="2", help="tensor-parallel sizes compared with tp=1")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--tp", type=int, help=argparse.SUPPRESS)  # child process: one size
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.tp:
        Path(args.result_file).write_text(json.dumps(generate(args, args.tp)))
        return
    forwarded = ["--model", args.model, "--model-root", args.model_root, "--dtype", args.dtype,
                 "--num-prompts", str(args.num_prompts), "--max-prompt-len", str(args.max_prompt_len),
                 "--new-tokens", str(args.new_tokens), *(["--enforce-eager"] if args.enforce_eager else [])]
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for tp in [1, *(int(s) for s in args.sizes.split(","))]:
            result_file = Path(scratch) / f"tp{tp}.json"
            child = [sys.executable, "-m", "benchmarks.tp_agreement", *forwarded, "--tp", str(tp),
                     "--result-file", str(result_file)]
            subprocess.run(child, check=True)
            runs[tp] = json.loads(result_file.read_text())
    rows = [{"tp": tp, **compare(runs[1], runs[tp])} for tp in runs if tp != 1]
    print_table(rows, f"greedy agreement with tp=1: {args.model}, {args.dtype}, {args.num_prompts} prompts, "
                      f"{args.new_tokens} new tokens{', eager' if args.enforce_eager else ''}")
    save_json(args.out, {"model": args.model, "command": " ".join(sys.argv), "table": rows})


if __name__ == "__main__":
    main()
