"""Host cost of a tensor-parallel step: where rank 0's decode step time goes at tp=2 against tp=1.

Two parts, both on CPU (gloo) by default:

- channel: rank 0 sends one decode step's inputs (STEP_FIELDS of batch B) to a
  worker process through the StepChannel, the worker builds its model inputs
  from them (ModelInputs.from_fields) and the two ranks meet in an all-gather.
  Reported per step: rank 0's send, the worker's input building, and the round trip.
- engine: decode steps of a small random model at tp=1 and tp=2, with overlap
  scheduling on and off: the mean step time, and the median time per call of
  rank 0's parts: prepare_step (input arrays from the persistent batch),
  channel send, execute_model (copy in and forward, which waits in its
  collectives for the workers) and sample; the rest is scheduling and update.

    python -m benchmarks.tp_host_overhead --model tiny --batches 1,8 --out tp_host.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.common import print_table, save_json
from benchmarks.latency import decode_ms_per_token
from benchmarks.workloads import MODEL_SHAPES, model_folder, token_id_limit
from engine.config import EngineConfig
from engine.distributed import Executor
from engine.distributed.step_channel import Field
from engine.llm_engine import LLMEngine
from engine.model_runner import STEP_FIELDS, ModelInputs

BLOCK_SIZE = 16


class InputBuildingRunner:
    """Every rank builds its model inputs from the fields and reports how long that took."""

    def __init__(self, config: SimpleNamespace):
        self.device = torch.device(config.device)

    def prepare_step(self, fields: dict[str, Field]) -> dict[str, Field]:
        return fields

    def execute_model(self, fields: dict[str, Field]) -> list[torch.Tensor]:
        start = time.perf_counter()
        ModelInputs.from_fields(fields, self.device)
        took = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        gathered = [torch.empty_like(took) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, took)
        return gathered

    def sample(self, result: list[torch.Tensor], fields: dict[str, Field]) -> list[torch.Tensor]:
        return result

    def receive_sampled(self, fields: dict[str, Field]) -> None:
        """Nothing is sampled here."""


def decode_fields(batch: int, context_len: int) -> dict[str, Field]:
    """A decode step's inputs as rank 0 sends them: one token per sequence, `context_len` tokens each."""
    width = -(-context_len // BLOCK_SIZE)
    rows = torch.arange(batch, dtype=torch.int64)
    return {
        "input_ids": rows + 10,
        "positions": torch.full((batch,), context_len - 1, dtype=torch.int64),
        "logits_indices": rows,
        "slot_mapping": rows * context_len + context_len - 1,
        "query_start_loc": torch.arange(batch + 1, dtype=torch.int32),
        "seq_lens": torch.full((batch,), context_len, dtype=torch.int32),
        "block_tables": torch.arange(batch * width, dtype=torch.int32).view(batch, width),
        "max_query_len": 1,
        "max_seq_len": context_len,
        "placeholder_dst": rows,
        "placeholder_src": rows,
    }


def timed(record: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    return wrapper


def channel_rows(batches: list[int], context_len: int, steps: int) -> list[dict[str, Any]]:
    executor = Executor(SimpleNamespace(tensor_parallel_size=2, device="cpu"), InputBuildingRunner, STEP_FIELDS)
    sends: list[float] = []
    channel = executor._ranks.channel
    channel.send = timed(sends, channel.send)
    rows = []
    try:
        for batch in batches:
            fields = decode_fields(batch, context_len)
            for _ in range(10):  # warm-up
                executor.execute(fields)
            sends.clear()
            round_trips, worker_build = [], []
            for _ in range(steps):
                start = time.perf_counter()
                gathered = executor.execute(fields)
                round_trips.append(time.perf_counter() - start)
                worker_build.append(float(gathered[1]))
            payload = sum(v.numel() * v.element_size() for v in fields.values() if isinstance(v, torch.Tensor))
            rows.append({
                "batch": batch,
                "payload_bytes": payload,
                "send_us": 1e6 * statistics.median(sends),
                "worker_build_us": 1e6 * statistics.median(worker_build),
                "round_trip_us": 1e6 * statistics.median(round_trips),
            })
    finally:
        executor.shutdown()
    return rows


def engine_rows(folder: Path, args: argparse.Namespace, batches: list[int], tp: int, overlap: bool) -> list[dict]:
    config = EngineConfig(model=str(folder), dtype=args.dtype, device=args.device, seed=0,
                          max_num_seqs=max(batches), max_model_len=args.prompt_len + args.new_tokens + BLOCK_SIZE,
                          tensor_parallel_size=tp, overlap_scheduling=overlap, small_all_reduce=args.small_all_reduce)
    engine = LLMEngine(config)
    parts: dict[str, list[float]] = defaultdict(list)
    runner = engine.core.model_runner
    for name in ("prepare_step", "execute_model", "sample"):
        setattr(runner, name, timed(parts[name], getattr(runner, name)))
    ranks = engine.core.executor._ranks
    if ranks is not None:
        ranks.channel.send = timed(parts["channel_send"], ranks.channel.send)
    vocab = token_id_limit(folder)
    rows = []
    try:
        decode_ms_per_token(engine, 1, args.prompt_len, 2, vocab)  # warm-up
        for batch in batches:
            for record in parts.values():
                record.clear()
            step = decode_ms_per_token(engine, batch, args.prompt_len, args.new_tokens, vocab)
            row = {"tp": tp, "overlap": overlap, "batch": batch, "step_ms": step["ms_per_step"]}
            for name in ("prepare_step", "channel_send", "execute_model", "sample"):
                row[f"{name}_ms"] = 1e3 * statistics.median(parts[name]) if parts[name] else 0.0
            rows.append(row)
    finally:
        engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="tiny")
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--context-len", type=int, default=1024, help="tokens per sequence in the channel part")
    parser.add_argument("--channel-steps", type=int, default=200)
    parser.add_argument("--small-all-reduce", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    channel = channel_rows(batches, args.context_len, args.channel_steps)
    print_table(channel, f"step channel alone (gloo, 2 processes), decode fields at context {args.context_len}")
    folder = model_folder(args.model, args.model_root)
    steps = []
    for tp, overlap in ((1, True), (2, True), (2, False)):
        steps += engine_rows(folder, args, batches, tp, overlap)
    print_table(steps, f"rank 0's decode step, {args.model}, {args.dtype} on {args.device} (medians per step)")
    save_json(args.out, {"model": args.model, "command": " ".join(sys.argv), "channel": channel, "engine": steps})


if __name__ == "__main__":
    main()
