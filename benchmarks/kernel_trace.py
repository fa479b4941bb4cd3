"""Kernel trace: where the GPU time of one engine step goes, by kernel family, from torch.profiler.

Loads the engine as benchmarks.latency does, warms up, then records steps with
torch.profiler (CPU and CUDA activity) and attributes every GPU activity
(kernels, copies, memsets) to the step whose engine.step() call launched it:
CUPTI gives a kernel replayed from a CUDA graph the correlation id of its
cudaGraphLaunch, and the launch call lies inside one step's annotation. With
overlap scheduling a step() call launches step n+1 and reads step n's tokens,
so each step's activities are those of one forward pass and its sampler.

  decode   --batch requests decoding together (CUDA graphs as in serving), --steps steps
  prefill  one request of --prefill-tokens prompt tokens (one step at the default
           8192-token budget), until its first token is back: one "step" here

Per step: wall time (mean step() call), kernel time (the activities' sum), GPU busy
(their union) and GPU idle (wall - busy: the GPU waiting for the host), and the
kernel time by family (FAMILIES), with launches, share of the wall time and mean
time per launch, and the top kernels by time. The decode row also has
benchmarks.latency's ms per step for the same batch on the same engine without
the profiler, so the profiler's own cost is visible.

With --tensor-parallel-size N this process is rank 0 (engine.distributed runs
it in-process, the other ranks in workers), and its kernels are the ones traced;
its all-reduce kernels include the time they wait for the other ranks.
On CPU there is no device activity: the table is of the CPU ops' own (exclusive) time.

    python -m benchmarks.kernel_trace --model llama-3.1-8b --batch 1 --prefill-tokens 8192 --out trace.json
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import gzip
import json
import random
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.common import save_json
from benchmarks.latency import (add_engine_arguments, all_decoding, decode_ms_per_token, engine_config,
                                graph_replay_ms, random_prompt)
from benchmarks.workloads import MODEL_SHAPES, QUANTIZED_GROUP_SIZE, quantized_model_folder, token_id_limit
from engine import SamplingParams
from engine.llm_engine import LLMEngine
from engine.output_processor import OutputKind
from engine.testing.quantized import QUANTIZED_FORMATS

STEP_MARKER = "kernel_trace/step"
OTHER = "elementwise/other"
# Kernel families by name, first match wins (case-insensitive). GPU names: kubellm's Triton kernels
# (kernels/), cuBLAS (nvjet, sm90_xmma, cutlass), NCCL and torch's own; CPU names: aten ops.
FAMILIES: tuple[tuple[str, str], ...] = (
    ("all-reduce/NCCL", r"nccl|c10d::|all_?reduce|all_?gather|one_?shot|two_?shot|multimem"),
    ("attention", r"_decode_kernel|_merge_splits|_prefill_kernel|attention|flash|scaled_dot_product"),
    ("cache write", r"store_kvcache|index_copy"),
    ("norm", r"rms_?norm|layer_?norm"),
    ("rotary", r"rotary|rope"),
    ("activation", r"silu|gelu"),
    # Only the separate launches: a norm or SiLU-and-mul that quantizes its output (_fp8_kernel) is above.
    ("FP8 activation quantization", r"quantize_per_token"),
    ("GEMM", r"gemm|gemv|cutlass|cublas|nvjet|xmma|splitk|_matmul|w4a16|_dequantize_kernel|sum_splits|aten::(mm|addmm|bmm|linear|matmul)$"),
    ("sampler", r"argmax|topk|sort|multinomial|exponential|softmax|cumsum"),
    ("embedding", r"embedding|index_?select"),
    ("copy/memset", r"memcpy|memset"),
)
_FAMILY_PATTERNS = [(family, re.compile(pattern, re.IGNORECASE)) for family, pattern in FAMILIES]
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
TOP_KERNELS = 15
PROMPT_STEPS_SLACK = 10  # decode steps of headroom for the steps before a whole batch decodes (traced_new_tokens)


def family_of(name: str) -> str:
    return next((family for family, pattern in _FAMILY_PATTERNS if pattern.search(name)), OTHER)


@dataclass(frozen=True)
class Activity:
    """One kernel, copy or memset (or, on CPU, one op) of a traced step."""

    name: str
    step: int
    start_us: float
    end_us: float
    self_us: float  # its own time: the duration, less nested ops' for a CPU op


def step_windows(events: list[dict[str, Any]]) -> list[tuple[float, float, Any]]:
    """(start, end, thread) of each traced step, in order."""
    marks = [e for e in events if e.get("cat") == "user_annotation" and e.get("name") == STEP_MARKER]
    return sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("tid")) for e in marks)


def _step_at(windows: list[tuple[float, float, Any]], starts: list[float], time_us: float) -> int | None:
    i = bisect.bisect_right(starts, time_us) - 1
    return i if i >= 0 and time_us <= windows[i][1] else None


def device_activities(events: list[dict[str, Any]], windows: list[tuple[float, float, Any]]) -> list[Activity]:
    """GPU activities, each in the step whose window holds the host call that launched it (by correlation
    id); activities launched outside every step are left out."""
    launches = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})}
    starts = [start for start, _, _ in windows]
    activities = []
    for e in events:
        if e.get("cat") not in DEVICE_CATEGORIES:
            continue
        launched = launches.get(e.get("args", {}).get("correlation"))
        step = _step_at(windows, starts, launched) if launched is not None else None
        if step is not None:
            start, duration = float(e["ts"]), float(e["dur"])
            activities.append(Activity(e["name"], step, start, start + duration, duration))
    return activities


def cpu_activities(events: list[dict[str, Any]], windows: list[tuple[float, float, Any]]) -> list[Activity]:
    """CPU ops on each step's own thread within its window, with their exclusive time."""
    activities = []
    for step, (start, end, thread) in enumerate(windows):
        ops = sorted(((float(e["ts"]), -float(e["dur"]), e["name"]) for e in events
                      if e.get("cat") == "cpu_op" and e.get("tid") == thread and start <= float(e["ts"]) <= end))
        open_ops: list[list] = []  # [end, name, start, self time] of the ops enclosing the current one
        for op_start, negative_duration, name in ops:
            op_end = op_start - negative_duration
            while open_ops and open_ops[-1][0] <= op_start:
                activities.append(_closed(open_ops.pop(), step))
            if open_ops:
                open_ops[-1][3] += negative_duration  # a nested op's time is not its parent's own
            open_ops.append([op_end, name, op_start, -negative_duration])
        activities.extend(_closed(op, step) for op in reversed(open_ops))
    return activities


def _closed(op: list, step: int) -> Activity:
    end, name, start, self_us = op
    return Activity(name, step, start, end, max(0.0, self_us))


def busy_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of the intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(activities: list[Activity], walls_us: list[float]) -> dict[str, Any]:
    """Per-step figures of the traced steps (walls_us: each step's wall time): totals, families, top kernels."""
    steps = len(walls_us)
    wall = sum(walls_us) / steps
    kernel = sum(a.self_us for a in activities) / steps
    by_step: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for a in activities:
        by_step[a.step].append((a.start_us, a.end_us))
    busy = sum(busy_us(intervals) for intervals in by_step.values()) / steps

    def grouped(key: Callable[[Activity], str]) -> list[dict[str, Any]]:
        count: dict[str, int] = defaultdict(int)
        total: dict[str, float] = defaultdict(float)
        for a in activities:
            count[key(a)] += 1
            total[key(a)] += a.self_us
        return [{"name": name, "launches_per_step": count[name] / steps, "us_per_step": total[name] / steps,
                 "share_of_wall": total[name] / steps / wall, "mean_us": total[name] / count[name]}
                for name in sorted(total, key=total.get, reverse=True)]

    return {"steps": steps, "wall_us": wall, "kernel_us": kernel, "busy_us": busy, "idle_us": wall - busy,
            "launches_per_step": len(activities) / steps, "families": grouped(lambda a: family_of(a.name)),
            "top_kernels": grouped(lambda a: a.name)[:TOP_KERNELS]}


def summarize_trace(events: list[dict[str, Any]]) -> dict[str, Any]:
    """summarize() of a chrome trace's steps: GPU activities when it has any, else CPU ops."""
    windows = step_windows(events)
    if not windows:
        raise ValueError(f"the trace has no {STEP_MARKER!r} annotations")
    on_device = any(e.get("cat") in DEVICE_CATEGORIES for e in events)
    activities = device_activities(events, windows) if on_device else cpu_activities(events, windows)
    summary = summarize(activities, [end - start for start, end, _ in windows])
    summary["source"] = "gpu" if on_device else "cpu ops"
    return summary


def markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as markdown: the step's totals, then the families, then the top kernels."""
    wall = summary["wall_us"]
    lines = [f"### {title}", "",
             f"{summary['steps']} steps ({summary['source']}): wall {wall:,.1f} us/step, kernel sum "
             f"{summary['kernel_us']:,.1f} us, busy {summary['busy_us']:,.1f} us, idle (gaps) "
             f"{summary['idle_us']:,.1f} us ({summary['idle_us'] / wall:.0%}), "
             f"{summary['launches_per_step']:,.1f} launches/step", ""]
    for heading, rows in (("family", summary["families"]), ("kernel", summary["top_kernels"])):
        lines += [f"| {heading} | launches/step | us/step | share of step | mean us |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {_cell(r['name'])} | {r['launches_per_step']:,.1f} | {r['us_per_step']:,.1f} | "
                  f"{r['share_of_wall']:.1%} | {r['mean_us']:,.2f} |" for r in rows]
        if heading == "family":
            lines.append(f"| idle (gaps) | | {summary['idle_us']:,.1f} | {summary['idle_us'] / wall:.1%} | |")
        lines.append("")
    return "\n".join(lines)


def _cell(name: str, width: int = 100) -> str:
    name = name.replace("|", "\\|")
    return name if len(name) <= width else name[: width - 3] + "..."


def record(engine: LLMEngine, unit: Callable[[], None], repeats: int, keep: Path | None) -> list[dict[str, Any]]:
    """Runs unit() `repeats` times under the profiler, each as one annotated step; the chrome trace's events
    (also written, gzipped, to `keep`).

    No synchronization before the first unit: with overlap scheduling the step in flight then is one
    launched before the trace, whose wait is part of the first unit's wall time as in every later one.
    """
    cuda = engine.config.device.startswith("cuda")
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as profiler:
        for _ in range(repeats):
            with record_function(STEP_MARKER):
                unit()
        if cuda:
            torch.cuda.synchronize()  # the last unit's activities end inside the trace
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        profiler.export_chrome_trace(str(path))
        if keep is not None:
            keep.parent.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as src, gzip.open(keep, "wb") as dst:
                shutil.copyfileobj(src, dst)
        return json.loads(path.read_text())["traceEvents"]


def trace_decode(engine: LLMEngine, batch: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """The decode steps of `batch` requests, after benchmarks.latency's figure for the same batch."""
    latency = decode_ms_per_token(engine, batch, args.prompt_len, args.new_tokens, vocab)
    new_tokens = traced_new_tokens(args)
    rng = random.Random(f"trace-{batch}")
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"trace-{batch}-{i}", random_prompt(rng, args.prompt_len, vocab), params,
                           output_kind=OutputKind.FINAL_ONLY)
    scheduler = engine.core.scheduler
    while not all_decoding(scheduler, batch, new_tokens):
        engine.step()
    for _ in range(args.warmup_steps):
        engine.step()

    def decode_step() -> None:
        if not all_decoding(scheduler, batch, new_tokens):
            raise RuntimeError("a traced step was not a decode step of the whole batch")
        engine.step()

    events = record(engine, decode_step, args.steps, _kept(args, f"decode-b{batch}"))
    while engine.has_unfinished_requests():
        engine.step()
    on_gpu = engine.config.device.startswith("cuda")
    return {"batch": batch, "latency_ms_per_step": latency["ms_per_step"],
            "graph_replay_ms": graph_replay_ms(engine, batch) if on_gpu else None, **summarize_trace(events)}


def traced_new_tokens(args: argparse.Namespace) -> int:
    """Tokens each traced decode request generates: the warm-up and traced steps, plus slack for the
    steps before all requests decode (a batch whose prompts take several chunked-prefill steps starts
    decoding its first requests early; on the H200 batch 128 failed with a slack of 2), so that no
    traced step has a request finishing in it."""
    return args.warmup_steps + args.steps + PROMPT_STEPS_SLACK


def trace_prefill(engine: LLMEngine, prompt_len: int, args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    """One request of prompt_len tokens until its first token is back, after one untraced warm-up."""
    rng = random.Random(f"prefill-{prompt_len}")
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def prefill() -> None:  # a fresh prompt each time: no prefix-cache hits
        engine.add_request(f"prefill-{rng.random()}", random_prompt(rng, prompt_len, vocab), params,
                           output_kind=OutputKind.FINAL_ONLY)
        while engine.has_unfinished_requests():
            engine.step()

    prefill()
    before = engine.core.model_runner.step_counts
    events = record(engine, prefill, 1, _kept(args, f"prefill-{prompt_len}"))
    steps = engine.core.model_runner.step_counts.since(before)
    return {"prompt_len": prompt_len, "forward_passes": dataclasses.asdict(steps), **summarize_trace(events)}


def _kept(args: argparse.Namespace, name: str) -> Path | None:
    return Path(args.trace_dir) / f"{args.model}-tp{args.tensor_parallel_size}-{name}.json.gz" if args.trace_dir else None


def checks(summary: dict[str, Any]) -> list[str]:
    """What says the figures measure what they name."""
    overlap = ("NO (activities overlap: several streams, or kernels launched early by PDL and waiting; "
               "KUBELLM_PDL=0 gives per-kernel times)")
    lines = [f"kernel sum {summary['kernel_us']:,.1f} us <= wall {summary['wall_us']:,.1f} us: "
             f"{'ok' if summary['kernel_us'] <= summary['wall_us'] else overlap}"]
    if summary.get("latency_ms_per_step") is not None:
        latency_us = 1e3 * summary["latency_ms_per_step"]
        lines.append(f"wall per step {summary['wall_us']:,.1f} us traced vs {latency_us:,.1f} us without the profiler "
                     f"(benchmarks.latency, same engine): profiler cost {summary['wall_us'] - latency_us:+,.1f} us")
    if summary.get("graph_replay_ms") is not None:
        lines.append(f"graph replay alone: {1e3 * summary['graph_replay_ms']:,.1f} us (busy {summary['busy_us']:,.1f} us)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=1, help="decode batch; 0: no decode trace")
    parser.add_argument("--steps", type=int, default=20, help="decode steps traced")
    parser.add_argument("--warmup-steps", type=int, default=5, help="decode steps run before the traced ones")
    parser.add_argument("--prefill-tokens", type=int, default=0, help="also trace a prompt of this length; 0: none")
    parser.add_argument("--weights", default="bf16", choices=["bf16", *QUANTIZED_FORMATS],
                        help="a checkpoint format: the bf16 folder is quantized into it once "
                        f"(groups of {QUANTIZED_GROUP_SIZE})")
    add_engine_arguments(parser)
    parser.add_argument("--trace-dir", help="keep the chrome traces here (gzipped; open them in Perfetto)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.batch < 0 or args.steps < 1 or args.warmup_steps < 0 or args.prefill_tokens < 0:
        parser.error("--batch, --warmup-steps and --prefill-tokens must be >= 0 and --steps >= 1")
    if not args.batch and not args.prefill_tokens:
        parser.error("nothing to trace: give --batch or --prefill-tokens")

    folder, _ = quantized_model_folder(args.model, args.weights, args.model_root)
    longest_prompt = max(args.prompt_len, args.prefill_tokens)
    most_new_tokens = max(args.new_tokens, traced_new_tokens(args))
    engine = LLMEngine(engine_config(folder, args, max(1, args.batch), longest_prompt, most_new_tokens))
    vocab = token_id_limit(folder)
    layers = engine.model_config.num_hidden_layers
    decode_ms_per_token(engine, 1, args.prompt_len, 2, vocab)  # warm-up
    results: dict[str, Any] = {}
    titles = {}
    if args.batch:
        results["decode"] = trace_decode(engine, args.batch, args, vocab)
        titles["decode"] = f"decode, batch {args.batch}"
    if args.prefill_tokens:
        results["prefill"] = trace_prefill(engine, args.prefill_tokens, args, vocab)
        titles["prefill"] = f"prefill, {args.prefill_tokens} prompt tokens (whole request)"
    engine.shutdown()

    print(f"\n## Kernel trace: {args.model}, {args.weights} weights, {args.dtype}, "
          f"quantization {args.quantization or 'none'}, "
          f"KV cache {args.kv_cache_dtype}, tp={args.tensor_parallel_size}"
          f"{' (rank 0)' if args.tensor_parallel_size > 1 else ''}, {engine.config.device}\n")
    for kind, summary in results.items():
        print(markdown(summary, titles[kind]))
        for line in [*checks(summary),
                     f"{summary['launches_per_step']:,.1f} launches per step: "
                     f"{summary['launches_per_step'] / layers:,.1f} per layer of {layers}"]:
            print(f"- {line}")
        print()
    save_json(args.out, {"model": args.model, "command": " ".join(sys.argv), "device": engine.config.device,
                         "tensor_parallel_size": args.tensor_parallel_size, "families": dict(FAMILIES), **results})


if __name__ == "__main__":
    main()
