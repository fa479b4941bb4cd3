"""Micro-benchmark of the fused MoE Triton kernel against a loop over experts, at real MoE layer shapes.

One MoE layer (bf16) at batch 1..256 tokens: the fused kernel (kernels/moe.py)
against the loop over the experts some token chose (kernels/moe_reference.py,
what Hugging Face's MoE blocks do: three GEMMs per expert hit, a gather and an
index_add between them). Correctness in bf16: both against the fp32 reference
on the same rounded inputs.

Memory roofline of a layer at batch B: every expert some token chose is read
once (3 * H * I weights), and nothing else, so the bound is that many bytes
over the device copy bandwidth measured in the same run (read + write bytes
per second, as benchmarks.latency uses). Routing is drawn at random, so at
B = 1 exactly top_k experts are active and at B = 256 nearly all.

The fused layer is timed as the engine runs it in decode, replayed from a CUDA
graph ("fused_us"), and also launched eagerly ("eager_us": at small batches
that is the host's launch time, not the GPU's). The loop syncs with the host
(it indexes by the experts hit), so it runs eagerly.

    python -m benchmarks.moe_gpu --out results/moe.json [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict

import torch

import kernels
from benchmarks.attention_kernels import bench_ms
from benchmarks.common import copy_bandwidth_gbs, environment, print_table, save_json
from engine.layers.moe import route
from kernels import moe_reference
from kernels.moe import GemvLaunchConfig, MoeLaunchConfig, default_moe_config

# name -> (hidden, expert intermediate, experts, top_k)
SHAPES = {"qwen3-30b-a3b": (2048, 768, 128, 8), "mixtral-8x7b": (4096, 14336, 8, 2)}
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def moe_problem(shape: str, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """bf16 hidden states and experts (fan-in scaled, so activations are of order one), random routing."""
    hidden, inter, num_experts, top_k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, hidden, generator=gen, device="cuda").to(torch.bfloat16)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device="cuda") * hidden**-0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device="cuda") * inter**-0.5).bfloat16()
    logits = torch.randn(batch, num_experts, generator=gen, device="cuda")
    weights, ids = route(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).norm() / ref.norm())


def graph_ms(fn) -> float:
    """Median ms of fn replayed from a CUDA graph (what a decode step pays, launches excluded)."""
    fn()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench_ms(graph.replay)


def moe_row(shape: str, batch: int, bandwidth: float,
            config: MoeLaunchConfig | GemvLaunchConfig | None = None, graph_only: bool = False) -> dict:
    hidden, inter, num_experts, top_k = SHAPES[shape]
    x, w13, w2, weights, ids = moe_problem(shape, batch, seed=batch)
    fused = lambda: kernels.fused_moe(x, w13, w2, weights, ids, config=config)  # noqa: E731
    loop = lambda: moe_reference.fused_moe(x, w13, w2, weights, ids)  # noqa: E731
    exact = moe_reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    fused_ms = graph_ms(fused)
    eager_ms, loop_ms = (float("nan"), float("nan")) if graph_only else (bench_ms(fused), bench_ms(loop))
    active = int(torch.unique(ids).numel())
    weight_bytes = active * 3 * hidden * inter * w13.element_size()
    roofline_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    flops = 2 * batch * top_k * 3 * hidden * inter
    return {"shape": shape, "batch": batch, "active_experts": active,
            "path": "gemv" if isinstance(config or default_moe_config(batch, top_k, num_experts),
                                         GemvLaunchConfig) else "grouped",
            "fused_us": 1e3 * fused_ms, "eager_us": 1e3 * eager_ms, "loop_us": 1e3 * loop_ms,
            "speedup": loop_ms / fused_ms,
            "roofline_us": 1e3 * roofline_ms, "%roofline": 100 * roofline_ms / fused_ms,
            "TFLOP/s": flops / fused_ms / 1e9,
            "fused_rel_err": relative_error(fused(), exact), "loop_rel_err": relative_error(loop(), exact)}


def sweep(shape: str, bandwidth: float, batches: list[int]) -> list[dict]:
    """The GEMV path's tiles at batches up to 8, the grouped GEMM's from 8 on."""
    configs: list[MoeLaunchConfig | GemvLaunchConfig] = [
        GemvLaunchConfig(block_n, block_k, warps)
        for block_n, block_k, warps in itertools.product((16, 32, 64), (64, 128, 256), (2, 4, 8))
    ] + [MoeLaunchConfig(block_m, block_n, block_k, warps, stages) for block_m, block_n, block_k, warps, stages
         in itertools.product((16, 32, 64), (64, 128), (64, 128), (4, 8), (3, 4))]
    rows = []
    for batch in batches:
        for config in configs:
            gemv = isinstance(config, GemvLaunchConfig)
            if (gemv and batch > 8) or (not gemv and batch < 8):
                continue
            try:
                row = moe_row(shape, batch, bandwidth, config, graph_only=True)
            except Exception as error:  # out of shared memory for big tiles: record and go on
                row = {"fused_us": float("nan"), "%roofline": float("nan"), "error": str(error)[:80]}
            rows.append({"config": str(config), "batch": batch, "fused_us": row["fused_us"],
                         "%roofline": row["%roofline"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--sweep", action="store_true", help="also sweep both paths' tiles (per shape)")
    parser.add_argument("--sweep-batches", default="1,2,4,8,64,256")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.moe_gpu needs a CUDA GPU")
    bandwidth = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {bandwidth:,.0f} GB/s (read + write)")
    results: dict = {"environment": environment(), "copy_bandwidth_gbs": bandwidth, "rows": []}
    for shape in args.shapes.split(","):
        rows = [moe_row(shape, batch, bandwidth) for batch in BATCHES]
        worst = max(max(r["fused_rel_err"], r["loop_rel_err"]) for r in rows)
        if worst > 2e-2:
            raise SystemExit(f"{shape}: relative error {worst:.2e} against the fp32 reference (over 2e-2)")
        _, _, num_experts, top_k = SHAPES[shape]
        print_table(rows, f"one MoE layer, {shape}, bf16 (default configs: batch 1 "
                          f"{default_moe_config(1, top_k, num_experts)}, batch 256 "
                          f"{default_moe_config(256, top_k, num_experts)})")
        results["rows"] += rows
    if args.sweep:
        results["sweep"] = {}
        for shape in args.shapes.split(","):
            batches = [int(b) for b in args.sweep_batches.split(",")]
            results["sweep"][shape] = rows = sweep(shape, bandwidth, batches)
            timed = [r for r in rows if r["fused_us"] == r["fused_us"]]  # NaN: the config did not run
            best = [min((r for r in timed if r["batch"] == b), key=lambda r: r["fused_us"]) for b in
                    sorted({r["batch"] for r in timed})]
            print_table(best, f"{shape}: the fastest config per batch, CUDA-graph replay")
    save_json(args.out, results)


if __name__ == "__main__":
    main()
