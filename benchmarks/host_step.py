"""The host's share of a decode step, on CPU: every engine step with the forward pass and the
sampling kernels taken out, so what is timed is the Python the GPU waits for when it is faster
than the host (scheduling, the persistent batch, sampling set-up, update, output processing).

The model's forward returns fixed logits and the sampler fixed token ids; everything around
them is the real engine (LLMEngine, FINAL_ONLY outputs, overlap scheduling). Compare trees by
running this in each (same machine, same moment, alternating), and pin it to one core:

    taskset -c 1 python -m benchmarks.host_step --batches 32,128 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import print_table, save_json
from benchmarks.latency import decode_ms_per_token
from benchmarks.workloads import model_folder
from engine.config import EngineConfig
from engine.layers.sampler import SamplerOutput
from engine.llm_engine import LLMEngine
from engine.model_runner import ModelInputs, ModelRunner, StepLogits


def without_device_work(runner: ModelRunner, vocab_size: int, max_rows: int) -> None:
    """Replace the runner's forward and sampling kernels by fixed results (inputs still prepared)."""
    logits = torch.zeros(max_rows, vocab_size)
    token_ids = torch.randint(0, vocab_size, (max_rows,), generator=torch.Generator().manual_seed(0))

    def execute_model(fields):
        inputs = runner._inputs = ModelInputs.from_fields(fields, runner.device)
        runner._fill_placeholders(inputs.input_ids, fields)
        num_rows = inputs.logits_indices.numel()
        return StepLogits(logits[:num_rows] if num_rows else None)

    runner.execute_model = execute_model
    runner.sampler = lambda step_logits, batch, penalties: SamplerOutput(
        token_ids[: step_logits.shape[0]].clone(), None, None
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    folder = model_folder("tiny", args.model_root)
    config = EngineConfig(model=str(folder), dtype="float32", device="cpu", max_num_seqs=max(batches),
                          max_model_len=args.new_tokens + 64, num_kv_blocks=max(batches) * (args.new_tokens + 64))
    engine = LLMEngine(config)
    vocab_size = engine.model_config.vocab_size
    without_device_work(engine.core.model_runner, vocab_size, max(batches))
    rows = []
    for batch in batches:
        decode_ms_per_token(engine, batch, 32, 16, vocab_size)  # warm-up
        times = [decode_ms_per_token(engine, batch, 32, args.new_tokens, vocab_size)["ms_per_step"]
                 for _ in range(args.repeats)]
        rows.append({"batch": batch, "host_ms_per_step_min": min(times), "median": statistics.median(times),
                     "us_per_sequence": 1e3 * min(times) / batch})
    print_table(rows, "host time per decode step (CPU, forward and sampling kernels taken out)")
    save_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
