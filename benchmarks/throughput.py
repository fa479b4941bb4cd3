"""Offline throughput: kubellm against transformers on the same model and prompts, in one run.

Systems (each in its own process, so one's GPU memory never crowds another):
  kubellm    LLM.generate on every request (greedy, ignore_eos, per-request output lengths)
  hf-static  transformers `generate`, sdpa, static batches of --static-batch, left-padded;
             a batch runs until its longest request is done (that is static batching's cost),
             and only each request's own output length counts as output
  hf-cb      transformers `generate_batch` (continuous batching, paged|sdpa); it takes one
             max_new_tokens for all requests, so each runs to the mean output length of the
             subset, and the tokens actually generated count

Baselines are slow, so they may run on the first --baseline-requests requests only; the
table says so. Rates are tokens per wall second of generation (model loading excluded).
kubellm's row also counts how its steps ran: decode steps and steps with prompt tokens
("mixed") replayed from CUDA graphs (up to --max-cudagraph-capture-size tokens), or eagerly.

    python -m benchmarks.throughput --model llama-3.1-8b --workload mixed --out results/tp.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, save_json
from benchmarks.workloads import MODEL_SHAPES, Request, make_workload, model_folder, token_id_limit

SYSTEMS = ("kubellm", "hf-static", "hf-cb")


def run_kubellm(folder: Path, requests: list[Request], args: argparse.Namespace) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              max_num_seqs=args.max_num_seqs, enforce_eager=args.enforce_eager,
              max_cudagraph_capture_size=args.max_cudagraph_capture_size,
              tensor_parallel_size=args.tensor_parallel_size, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    runner = llm.llm_engine.core.model_runner
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up: compiles the prefill kernels
    _synchronize()
    before = runner.step_counts
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    _synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    # How the run's forward passes ran: decode graphs, mixed-step graphs (steps with prompt tokens), eagerly.
    steps = dataclasses.asdict(runner.step_counts.since(before))
    graphs = runner.cuda_graphs
    return {"elapsed_s": elapsed, "output_tokens": generated, "generated_tokens": generated,
            "stats": vars(llm.get_stats()), "steps": steps, "kv_blocks": runner.num_kv_blocks,
            "kv_cache_gib": runner.num_kv_blocks * runner.bytes_per_block / 2**30,  # as the start-up report
            "cuda_graph_gib": graphs.memory_bytes / 2**30 if graphs else 0.0,
            "cuda_graph_capture_s": graphs.capture_seconds if graphs else 0.0}


def _load_hf(folder: Path, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    return model.eval(), device


def run_hf_static(folder: Path, requests: list[Request], args: argparse.Namespace) -> dict:
    model, device = _load_hf(folder, args)
    pad_id = 0
    elapsed, useful, generated = 0.0, 0, 0
    for first in range(0, len(requests), args.static_batch):
        batch = requests[first : first + args.static_batch]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.tensor([[pad_id] * (width - len(r.prompt_token_ids)) + r.prompt_token_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_token_ids)) + [1] * len(r.prompt_token_ids) for r in batch])
        new_tokens = max(r.output_len for r in batch)
        _synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id)
        _synchronize()
        elapsed += time.perf_counter() - start
        generated += (out.shape[1] - width) * len(batch)
        useful += sum(r.output_len for r in batch)
    return {"elapsed_s": elapsed, "output_tokens": useful, "generated_tokens": generated}


def run_hf_cb(folder: Path, requests: list[Request], args: argparse.Namespace) -> dict:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model, _ = _load_hf(folder, args)
    mean_output = round(statistics.mean(r.output_len for r in requests))
    config = GenerationConfig(max_new_tokens=mean_output, do_sample=False, eos_token_id=-1, pad_token_id=0)
    inputs = [r.prompt_token_ids for r in requests]
    cb_config = ContinuousBatchingConfig(max_requests_per_batch=args.max_num_seqs)
    model.generate_batch(inputs[:2], generation_config=config, continuous_batching_config=cb_config)  # warm-up
    _synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch(inputs, generation_config=config, continuous_batching_config=cb_config)
    _synchronize()
    elapsed = time.perf_counter() - start
    generated = sum(len(o.generated_tokens) for o in outputs.values())
    return {"elapsed_s": elapsed, "output_tokens": generated, "generated_tokens": generated,
            "max_new_tokens_each": mean_output}


RUNNERS = {"kubellm": run_kubellm, "hf-static": run_hf_static, "hf-cb": run_hf_cb}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_one_system(args: argparse.Namespace) -> dict:
    """Run args.system on its share of the workload (called in a child process)."""
    folder = model_folder(args.model, args.model_root)
    requests = make_workload(args.workload, token_id_limit(folder), args.num_requests, scale=args.length_scale)
    if args.system != "kubellm":
        requests = requests[: args.baseline_requests]
    result = RUNNERS[args.system](folder, requests, args)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    result.update(system=args.system, requests=len(requests), prompt_tokens=prompt_tokens,
                  output_tok_s=result["output_tokens"] / result["elapsed_s"],
                  total_tok_s=(result["output_tokens"] + prompt_tokens) / result["elapsed_s"])
    return result


def child_command(args: argparse.Namespace, system: str, result_file: str) -> list[str]:
    forwarded = ["--model", args.model, "--workload", args.workload, "--model-root", args.model_root,
                 "--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                 "--max-num-seqs", str(args.max_num_seqs), "--static-batch", str(args.static_batch),
                 "--baseline-requests", str(args.baseline_requests), "--length-scale", str(args.length_scale),
                 "--tensor-parallel-size", str(args.tensor_parallel_size), "--kv-cache-dtype", args.kv_cache_dtype]
    if args.quantization:
        forwarded += ["--quantization", args.quantization]
    if args.num_requests:
        forwarded += ["--num-requests", str(args.num_requests)]
    if args.enforce_eager:
        forwarded.append("--enforce-eager")
    if args.max_cudagraph_capture_size:
        forwarded += ["--max-cudagraph-capture-size", str(args.max_cudagraph_capture_size)]
    return [sys.executable, "-m", "benchmarks.throughput", *forwarded, "--system", system, "--result-file", result_file]


def summarize(results: list[dict]) -> list[dict]:
    ours = next((r for r in results if r["system"] == "kubellm"), None)
    rows = []
    for r in results:
        row = {"system": r["system"], "requests": r["requests"], "elapsed_s": r["elapsed_s"],
               "output_tok/s": r["output_tok_s"], "total_tok/s": r["total_tok_s"]}
        if "steps" in r:
            steps = r["steps"]
            row["steps decode graph / mixed graph / eager"] = (
                f"{steps['decode_graph']} / {steps['mixed_graph']} / {steps['eager']}")
        if ours and r is not ours:
            row["kubellm_speedup_output"] = ours["output_tok_s"] / r["output_tok_s"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--workload", choices=["mixed", "fixed"], default="mixed")
    parser.add_argument("--num-requests", type=int, help="default: 256 (mixed) / 1024 (fixed)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {SYSTEMS}")
    parser.add_argument("--baseline-requests", type=int, default=64, help="requests the baselines run")
    parser.add_argument("--static-batch", type=int, default=64)
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--quantization", help="kubellm's --quantization (e.g. fp8: online FP8 weights)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="kubellm's --kv-cache-dtype (auto or fp8)")
    parser.add_argument("--max-cudagraph-capture-size", type=int, help="kubellm's; default: the engine's")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs kubellm shards the model across")
    parser.add_argument("--system-timeout", type=float, default=None, help="seconds per system, loading included")
    parser.add_argument("--length-scale", type=float, default=1.0, help="shrink lengths (smoke tests)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--system", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.system:  # child process: one system, result to a file
        Path(args.result_file).write_text(json.dumps(run_one_system(args)))
        return
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for system in args.systems.split(","):
            result_file = Path(scratch) / f"{system}.json"
            try:
                subprocess.run(child_command(args, system, str(result_file)), check=True, timeout=args.system_timeout)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
                print(f"{system} did not finish: {error}")
                continue
            results.append(json.loads(result_file.read_text()))
            result = results[-1]
            graphs = (f"; KV cache {result['kv_blocks']:,} blocks in {result['kv_cache_gib']:.1f} GiB"
                      f"; CUDA graphs {result['cuda_graph_gib']:.2f} GiB, captured in "
                      f"{result['cuda_graph_capture_s']:.1f} s" if "cuda_graph_gib" in result else "")
            print(f"{system}: {result['output_tok_s']:,.0f} output tok/s "
                  f"({result['requests']} requests, {result['elapsed_s']:.1f} s{graphs})", flush=True)
    rows = summarize(results)
    print_table(rows, f"offline throughput: {args.model}, workload {args.workload}, {args.dtype}, "
                      f"kubellm tp={args.tensor_parallel_size} "
                      f"(baselines on the first {args.baseline_requests} requests)")
    save_json(args.out, {"model": args.model, "workload": args.workload, "command": " ".join(sys.argv),
                         "results": results, "table": rows})


if __name__ == "__main__":
    main()
