"""Time per all-reduce of a decode step's message sizes, at tp=2 on two GPUs: NCCL against the
one-shot symmetric-memory all-reduce (engine.distributed.small_all_reduce), eagerly and replayed
from a CUDA graph that holds 64 of them (a Llama-3.1-8B decode step makes 64).

Where an 8B decode step at tp=2 loses time against half of tp=1's, this says how much of it the
all-reduces explain: 64 x the graph figure at the step's message size (batch x 4096 x 2 bytes).

    python -m benchmarks.all_reduce_latency --out all_reduce.json
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import print_table, save_json
from engine.distributed import parallel_state, small_all_reduce

HIDDEN = 4096
CALLS_PER_GRAPH = 64


def _time_us(fn, repeats: int) -> float:
    """Mean GPU microseconds per call of fn, from CUDA events around `repeats` calls."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / repeats


def _rank(rank: int, port: int, batches: list[int], queue) -> None:
    os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    store = parallel_state.connect_store(port, 2) if rank else parallel_state.create_store(2)
    if rank == 0:
        queue.put(store.port)
    torch.cuda.set_device(rank)
    parallel_state.init_distributed(rank, 2, store, "cuda")
    small_all_reduce.enable(torch.device("cuda", rank), torch.bfloat16)
    one_shot = small_all_reduce.active()
    rows = []
    for batch in batches:
        x = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device="cuda")
        row = {"batch": batch, "message_kib": x.numel() * 2 / 1024}
        ways = {"nccl": lambda: dist.all_reduce(x)}
        if one_shot is not None and one_shot.can_reduce(x):
            ways["one_shot"] = lambda: one_shot(x)
        for name, reduce in ways.items():

            def many(reduce=reduce) -> None:
                for _ in range(CALLS_PER_GRAPH):
                    reduce()

            row[f"{name}_eager_us"] = _time_us(reduce, 200)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                many()
            row[f"{name}_graph_us"] = _time_us(graph.replay, 20) / CALLS_PER_GRAPH
            graph.reset()
        rows.append(row)
    dist.barrier()
    if rank == 0:
        queue.put(rows)
    parallel_state.destroy_distributed(coordinated=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    context = mp.get_context("spawn")
    queue = context.Queue()
    first = context.Process(target=_rank, args=(0, 0, batches, queue))
    first.start()
    port = queue.get(timeout=120)
    second = context.Process(target=_rank, args=(1, port, batches, queue))
    second.start()
    rows = queue.get(timeout=300)
    for process in (first, second):
        process.join(timeout=60)
    print_table(rows, f"all-reduce at tp=2, bfloat16 [batch, {HIDDEN}], us per call (graph: {CALLS_PER_GRAPH} per replay)")
    if args.out:
        save_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
