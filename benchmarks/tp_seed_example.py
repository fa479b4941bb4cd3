"""The tensor-parallel example users start from, as written (a local folder for the hub id).

It never shuts the engine down: leaving the interpreter must stop the workers
and release the CUDA graphs and NCCL communicators by itself, so the process
ends instead of waiting in NCCL's teardown.

    python -m benchmarks.tp_seed_example --model llama-3.1-8b --model-root /dev/shm/models
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.workloads import MODEL_SHAPES, model_folder
from engine import LLM, SamplingParams

PROMPTS = ["Hello, my name is", "The president of the United States is", "The capital of France is",
           "The future of AI is"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--tensor-parallel-size", type=int, default=2)
    parser.add_argument("--max-model-len", type=int, default=8192, help="the example's; less for tiny shapes")
    args = parser.parse_args()

    start = time.perf_counter()
    llm = LLM(model=str(model_folder(args.model, args.model_root)), tensor_parallel_size=args.tensor_parallel_size,
              dtype="float16", gpu_memory_utilization=0.90, max_model_len=args.max_model_len)
    loaded = time.perf_counter()
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512))
    done = time.perf_counter()
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(f"loaded in {loaded - start:.1f} s; {len(outputs)} outputs, {tokens} tokens in {done - loaded:.1f} s")
    for output in outputs:
        print(repr(output.prompt), "->", repr(output.outputs[0].text[:60]))


if __name__ == "__main__":
    main()
