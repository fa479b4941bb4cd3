"""Latency: decode ms per token at batch 1 and 32 against the memory roofline, and TTFT by prompt length.

Memory roofline of a decode step: every weight is read once per step, so a
step takes at least weight_bytes / copy_bandwidth, with the copy bandwidth
(bytes read + written per second of a large device-to-device copy) measured
in the same run. The input embedding is excluded (a step reads only B rows of it).
In an MoE layer a step reads only the experts its tokens chose: top_k of them
at batch 1; at batch B the expected number under uniform routing,
E * (1 - (1 - top_k / E) ** B), so above batch 1 the MoE roofline is an estimate.

Where the time goes: the engine's wall time per decode step against the GPU
time of replaying that step's CUDA graph alone; "host share" is the part of the
step the graph does not explain (host work the overlap did not hide: scheduling,
input preparation, sampling launches, detokenizing).
"gpu_idle" is measured at every tp size: the share of the decode steps' time
that rank 0's GPU waited for the host between one step's work and the next's.

With --tensor-parallel-size N the weight bytes and the roofline are one GPU's
(each reads its shard), and the graph replay is not timed: rank 0's graph
alone would wait in its all-reduces for the other ranks.

    python -m benchmarks.latency --model llama-3.1-8b --out results/latency.json
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import copy_bandwidth_gbs, cuda_time_s, print_table, save_json
from benchmarks.workloads import MODEL_SHAPES, model_folder, token_id_limit
from engine import SamplingParams
from engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from engine.distributed import small_all_reduce
from engine.layers.moe import FusedExperts
from engine.llm_engine import LLMEngine
from engine.output_processor import OutputKind
from engine.scheduler import Scheduler


def weight_bytes(engine: LLMEngine, batch: int = 1) -> int:
    """Weight bytes a decode step of `batch` sequences reads (see the module docstring)."""
    model = engine.core.model_runner.model
    embedding = model.model.embed_tokens.weight
    tied = model.lm_head.weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for experts in (m for m in model.modules() if isinstance(m, FusedExperts)):
        num_experts, top_k = experts.num_experts, engine.model_config.moe.top_k
        unread = num_experts - num_experts * (1 - (1 - top_k / num_experts) ** batch)
        per_expert = sum(p[0].numel() * p.element_size() for p in (experts.w13_weight, experts.w2_weight))
        total -= round(unread * per_expert)
    return total if tied else total - embedding.numel() * embedding.element_size()


def random_prompt(rng: random.Random, length: int, vocab_size: int) -> list[int]:
    return [rng.randrange(10, vocab_size) for _ in range(length)]


def decode_ms_per_token(engine: LLMEngine, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> dict:
    """Mean wall ms per engine step while every request decodes (prefill and drain steps excluded).

    Outputs are FINAL_ONLY, as offline callers get them. With overlap scheduling a step()
    call launches step n+1 and finishes step n, so in steady state its wall time is the
    period of the step loop.
    """
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"decode-{batch}-{i}", random_prompt(rng, prompt_len, vocab), params,
                           output_kind=OutputKind.FINAL_ONLY)
    scheduler = engine.core.scheduler
    decode = []
    gpu = StepEvents(engine) if engine.config.device.startswith("cuda") else None
    while engine.has_unfinished_requests():
        decoding = all_decoding(scheduler, batch, new_tokens)
        start = time.perf_counter()
        if gpu is not None:
            gpu.recording = decoding
        engine.step()
        if decoding:
            decode.append(time.perf_counter() - start)
    if gpu is not None:
        gpu.detach()
    row = {"batch": batch, "decode_steps": len(decode), "ms_per_step": 1e3 * sum(decode) / max(1, len(decode))}
    row["gpu_idle"] = f"{100 * gpu.idle_share():.0f}%" if gpu is not None else None
    return row


def all_decoding(scheduler: Scheduler, batch: int, new_tokens: int) -> bool:
    """Whether the next step is a decode step of all `batch` requests (no prompt chunks, none finishing)."""
    return not scheduler.waiting and len(scheduler.running) == batch and all(
        not seq.is_prefilling and seq.num_output_tokens < new_tokens for seq in scheduler.running
    )


class StepEvents:
    """CUDA events around each decode step's launch on rank 0, for the share of time its GPU
    waits for the host: the gaps between one step's work ending and the next one's starting.

    Unlike the graph replay (tp=1 only) this works at every tp size; a rank 0 waiting in an
    all-reduce for a late worker counts as busy.
    """

    def __init__(self, engine: LLMEngine):
        self.recording = False
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        executor = engine.core.executor
        launch = executor.execute

        def recorded_launch(batch):
            if not self.recording:
                return launch(batch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = launch(batch)
            end.record()
            self.events.append((start, end))
            return result

        self._executor = executor
        executor.execute = recorded_launch

    def detach(self) -> None:
        del self._executor.execute  # the class's own method again

    def idle_share(self) -> float:
        if len(self.events) < 2:
            return 0.0
        torch.cuda.synchronize()
        gaps = sum(end.elapsed_time(start) for (_, end), (start, _) in zip(self.events, self.events[1:]))
        return max(0.0, gaps) / self.events[0][0].elapsed_time(self.events[-1][1])


def graph_replay_ms(engine: LLMEngine, batch: int) -> float | None:
    graphs = engine.core.model_runner.cuda_graphs
    decode = graphs.decode if graphs else None
    if decode is None or engine.config.tensor_parallel_size > 1:
        return None
    shape = decode.shape_for(batch, batch)
    return 1e3 * cuda_time_s(decode.graphs[shape].replay) if shape else None


def time_to_first_token(engine: LLMEngine, prompt_len: int, vocab: int) -> dict:
    """TTFT of one request on an empty engine, and how its steps ran (prompt steps replay mixed-step
    graphs up to max_cudagraph_capture_size tokens)."""
    prompt = random_prompt(random.Random(prompt_len), prompt_len, vocab)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    runner = engine.core.model_runner
    before = runner.step_counts
    start = time.perf_counter()
    engine.add_request(f"ttft-{prompt_len}", prompt, params, output_kind=OutputKind.FINAL_ONLY)
    while engine.has_unfinished_requests():
        engine.step()
    ttft_ms = 1e3 * (time.perf_counter() - start)
    steps = runner.step_counts.since(before)
    return {"prompt_len": prompt_len, "ttft_ms": ttft_ms, "mixed_graph_steps": steps.mixed_graph,
            "eager_steps": steps.eager}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the model folder and the engine, shared with benchmarks.kernel_trace."""
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt length of the decode runs")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-cudagraph-capture-size", type=int, help="default: the engine's")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--small-all-reduce", action="store_true",
                        help="one-shot symmetric-memory all-reduces for small messages (tensor parallelism)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=EngineConfig.gpu_memory_utilization)
    parser.add_argument("--quantization", help="e.g. fp8: quantize the bf16 folder's weights at load time")
    parser.add_argument("--kv-cache-dtype", default="auto")


def engine_config(folder: Path, args: argparse.Namespace, max_num_seqs: int, longest_prompt: int,
                  most_new_tokens: int) -> EngineConfig:
    """The engine of the decode and TTFT runs: room for max_num_seqs sequences, the longest prompt in
    one step (at least 8192 tokens, the engine's default budget) and most_new_tokens after it."""
    return EngineConfig(model=str(folder), dtype=args.dtype, seed=0, enforce_eager=args.enforce_eager,
                        max_num_seqs=max_num_seqs, max_model_len=longest_prompt + most_new_tokens,
                        max_num_batched_tokens=max(DEFAULT_MAX_NUM_BATCHED_TOKENS, longest_prompt),
                        max_cudagraph_capture_size=args.max_cudagraph_capture_size,
                        tensor_parallel_size=args.tensor_parallel_size, small_all_reduce=args.small_all_reduce,
                        gpu_memory_utilization=args.gpu_memory_utilization, quantization=args.quantization,
                        kv_cache_dtype=args.kv_cache_dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--ttft-lens", default="1024,4096,16384")
    add_engine_arguments(parser)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    ttft_lens = [int(n) for n in args.ttft_lens.split(",") if n]
    folder = model_folder(args.model, args.model_root)
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(engine_config(folder, args, max(batches), max([*ttft_lens, args.prompt_len]), args.new_tokens))
    vocab = token_id_limit(folder)
    on_gpu = engine.config.device.startswith("cuda")
    bandwidth = copy_bandwidth_gbs() if on_gpu else None
    weights = weight_bytes(engine)
    roofline_ms = 1e3 * weights / (bandwidth * 1e9) if bandwidth else None  # batch 1

    decode_ms_per_token(engine, 1, args.prompt_len, 2, vocab)  # warm-up
    decode_rows = []
    for batch in batches:
        row = decode_ms_per_token(engine, batch, args.prompt_len, args.new_tokens, vocab)
        row["graph_replay_ms"] = graph_replay_ms(engine, batch) if on_gpu else None
        row["host share"] = (
            f"{100 * (1 - row['graph_replay_ms'] / row['ms_per_step']):.0f}%" if row["graph_replay_ms"] else None
        )
        step_roofline_ms = 1e3 * weight_bytes(engine, batch) / (bandwidth * 1e9) if bandwidth else None
        row["roofline_ms"] = step_roofline_ms
        row["%roofline"] = 100 * step_roofline_ms / row["ms_per_step"] if step_roofline_ms else None
        row["tokens/s"] = 1e3 * batch / row["ms_per_step"]
        decode_rows.append(row)
    time_to_first_token(engine, min(ttft_lens) - 1, vocab)  # warm-up; another prompt, so no prefix-cache hit
    ttft_rows = [time_to_first_token(engine, n, vocab) for n in ttft_lens]

    print(f"weights: {weights / 1e9:.2f} GB; copy bandwidth: {bandwidth or float('nan'):,.0f} GB/s; "
          f"roofline per batch-1 decode step: {roofline_ms or float('nan'):.3f} ms")
    if args.small_all_reduce:  # rank 0 decides with the others: all use it, or all use NCCL
        print(f"small all-reduce: {'on' if small_all_reduce.active() is not None else 'off (NCCL; see the warning)'}")
    engine.shutdown()
    print_table(decode_rows, f"decode latency, {args.model}, {args.dtype}, tp={args.tensor_parallel_size}, "
                             f"prompt {args.prompt_len}, "
                             f"{args.new_tokens} new tokens")
    print_table(ttft_rows, "time to first token (one request, empty engine)")
    save_json(args.out, {"model": args.model, "command": " ".join(sys.argv), "weight_bytes": weights,
                         "tensor_parallel_size": args.tensor_parallel_size,
                         "copy_bandwidth_gbs": bandwidth, "decode": decode_rows, "ttft": ttft_rows})


if __name__ == "__main__":
    main()
