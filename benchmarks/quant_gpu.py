"""Quantized GEMMs and decode on one GPU: W4A16 and FP8 against bf16 in the same run.

1. GEMM: y = x W^T at Llama-3.1-8B's four linear shapes for batch 1..256: bf16 torch
   matmul, the W4A16 Triton kernel (group 128, zero points), and FP8 (fp8_linear:
   per-token activation quantization + the FP8 GEMM). Timed as decode runs them: many
   calls in one CUDA graph (no host launch gaps), each on another copy of the weight so
   that none is read from L2. Each result is checked against its torch reference.
   Then the GEMMs of a whole decode step (8B: 32 layers, 128 GEMMs; 70B: 80 layers, in the
   formats that fit), one graph per format, and with --sweep-batches the Triton tile choices.
2. Decode (--decode): random-weight models of a factory shape written in each format by
   engine.testing.quantized (the formats' published layouts), served by LLMEngine;
   ms per decode step at the given batch sizes, as benchmarks.latency measures it.
   The 70B shape is written straight in W4A16 (no 141 GB bf16 copy on disk).

    python -m benchmarks.quant_gpu --out results/quant_gemm.json
    python -m benchmarks.quant_gpu --skip-gemm --stack-batches '' --sweep-batches 1,16,64 --out sweep.json
    python -m benchmarks.quant_gpu --skip-gemm --stack-model llama-3.1-70b --stack-formats w4a16 --stack-batches 1,32
    python -m benchmarks.quant_gpu --skip-gemm --decode --model llama-3.1-8b --formats bf16,fp8,awq --out r.json
    python -m benchmarks.quant_gpu --skip-gemm --decode --model llama-3.1-70b --formats awq --batches 1,32
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton

import kernels
from benchmarks.common import copy_bandwidth_gbs, cuda_time_s, print_table, save_json
from benchmarks.latency import decode_ms_per_token, weight_bytes
from benchmarks.workloads import MODEL_SHAPES, QUANTIZED_GROUP_SIZE, quantized_model_folder, token_id_limit
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.testing.quantized import QUANTIZED_FORMATS
from kernels import quant_reference as ref
from kernels.fp8 import Fp8Config
from kernels.fp8 import default_config as fp8_default_config
from kernels.fp8 import takes_weight_only_gemv
from kernels.fp8_gemv import DEFAULT_CONFIG as FP8_GEMV_DEFAULT
from kernels.fp8_gemv import Fp8GemvConfig
from kernels.w4a16 import GEMV_CONFIGS, W4A16Config, W4A16GemvConfig
from kernels.w4a16 import default_config as w4a16_default_config

LLAMA_8B_GEMMS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
# (K, N) of each layer's GEMMs and the layer count, per model shape of the decode-GEMM stack
STACK_SHAPES = {
    "llama-3.1-8b": (LLAMA_8B_GEMMS, 32),
    "llama-3.1-70b": ({"qkv": (8192, 10240), "o": (8192, 8192), "gate_up": (8192, 57344), "down": (28672, 8192)}, 80),
}
STACK_FORMATS = ("bf16", "w4a16", "fp8")
GROUP_SIZE = QUANTIZED_GROUP_SIZE
L2_FLUSH_BYTES = 256 << 20  # rotate over weight copies at least this large, so no launch reads from L2


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).norm() / expected.float().norm())


@dataclass
class GemmWeights:
    """One linear layer's weight in each format."""

    bf16: torch.Tensor | None  # [N, K]
    w4: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None  # qweight, scales, zeros
    fp8: tuple[torch.Tensor, torch.Tensor] | None  # weight, weight_scale

    @staticmethod
    def random(k: int, n: int, formats: tuple[str, ...] = STACK_FORMATS) -> GemmWeights:
        """Kept in the given formats only (the 70B shape does not fit in bf16)."""
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        return GemmWeights(weight if "bf16" in formats else None,
                           ref.quantize_w4(weight, GROUP_SIZE, zero_point=True) if "w4a16" in formats else None,
                           ref.quantize_fp8_per_channel(weight) if "fp8" in formats else None)


KernelConfig = W4A16Config | W4A16GemvConfig | Fp8Config | Fp8GemvConfig | None


def gemm_calls(fmt: str, x: torch.Tensor, w: GemmWeights, config: KernelConfig = None) -> Callable[[], torch.Tensor]:
    """y = x W^T in one format (config: a W4A16Config / Fp8Config to try instead of the default)."""
    if fmt == "bf16":
        return lambda: x @ w.bf16.t()
    if fmt == "w4a16":
        return lambda: kernels.w4a16_matmul(x, *w.w4, GROUP_SIZE, config=config)
    if fmt == "fp8" and isinstance(config, Fp8GemvConfig):
        return lambda: kernels.fp8_weight_only_gemv(x, *w.fp8, config=config)
    if fmt == "fp8":
        return lambda: kernels.fp8_linear(x, *w.fp8, config=config)
    raise ValueError(fmt)


def captured(calls: list[Callable[[], torch.Tensor]]) -> torch.cuda.CUDAGraph:
    """The calls captured back to back in one CUDA graph (how decode runs them: no launch gaps), replayed once."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return graph


def graph_us(calls: list[Callable[[], torch.Tensor]], replays: int = 10) -> float:
    """µs per call of the calls captured in one CUDA graph."""
    return 1e6 * cuda_time_s(captured(calls).replay, warmup=2, repeat=replays) / len(calls)


def weight_copies(k: int, n: int) -> list[GemmWeights]:
    """Enough random weights of one shape that cycling through them never hits L2 in bf16."""
    return [GemmWeights.random(k, n) for _ in range(max(2, -(-L2_FLUSH_BYTES // (2 * k * n))))]


def check(fmt: str, x: torch.Tensor, w: GemmWeights, config: KernelConfig = None) -> float:
    """Relative error of a quantized format against its torch reference on the same quantized weight."""
    out = gemm_calls(fmt, x, w, config)()
    if fmt == "w4a16":
        expected = ref.w4a16_matmul(x, *w.w4, GROUP_SIZE)
    elif isinstance(config, Fp8GemvConfig) or takes_weight_only_gemv(x, config):
        expected = ref.fp8_weight_only_matmul(x, *w.fp8)
    else:
        expected = ref.fp8_linear(x, *w.fp8)
    return relative_error(out, expected)


def gemm_rows(batches: list[int]) -> list[dict]:
    """Each Llama-3.1-8B GEMM at each batch: bf16 torch matmul, W4A16 and FP8 (quantize + GEMM), graph-timed."""
    rows = []
    for name, (k, n) in LLAMA_8B_GEMMS.items():
        copies = weight_copies(k, n)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"gemm": name, "M": m, "K": k, "N": n}
            for fmt in ("bf16", "w4a16", "fp8"):
                row[f"{fmt}_us"] = graph_us([gemm_calls(fmt, x, w) for w in copies])
            row["w4a16_x"] = row["bf16_us"] / row["w4a16_us"]
            row["fp8_x"] = row["bf16_us"] / row["fp8_us"]
            row["bf16_GB/s"] = 2 * k * n / row["bf16_us"] / 1e3
            row["w4a16_GB/s"] = (k * n // 2 + 4 * (k // GROUP_SIZE) * n) / row["w4a16_us"] / 1e3
            row["fp8_GB/s"] = k * n / row["fp8_us"] / 1e3
            row["w4a16_err"] = check("w4a16", x, copies[0])
            row["fp8_err"] = check("fp8", x, copies[0])
            rows.append(row)
        del copies
        torch.cuda.empty_cache()
    return rows


def decode_stack_rows(model: str, formats: tuple[str, ...], batches: list[int]) -> list[dict]:
    """The GEMMs of one decode step of a model shape: every layer's qkv, o, gate_up and down, each with
    its own weights, in one CUDA graph per format. Attention, norms and the bf16 lm_head are left out:
    they are the same work in every format."""
    gemms, num_layers = STACK_SHAPES[model]
    layers = [{name: GemmWeights.random(k, n, formats) for name, (k, n) in gemms.items()} for _ in range(num_layers)]
    rows = []
    for m in batches:
        xs = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _ in gemms.values()}}
        row = {"model": model, "M": m}
        for fmt in formats:
            calls = [gemm_calls(fmt, xs[k], layer[name]) for layer in layers for name, (k, _) in gemms.items()]
            row[f"{fmt}_ms"] = graph_us(calls, replays=5) * len(calls) / 1e3
        for fmt in formats:
            if fmt != "bf16" and "bf16" in formats:
                row[f"{fmt}_x"] = row["bf16_ms"] / row[f"{fmt}_ms"]
        rows.append(row)
    del layers
    torch.cuda.empty_cache()
    return rows


SWEEP_PASSES = 3  # rounds of the sweep's timings, each in a fresh random order of the candidates


def sweep_candidates(m: int, formats: set[str]) -> list[tuple[str, KernelConfig]]:
    """The (format, config) pairs the sweep times at M rows: Triton tiles of each path asked for, and with
    "defaults" each default config next to the same launch with the other way of adding its K splits."""
    w4_tiles = [(64, 128, 4, 4), (64, 128, 4, 3), (32, 128, 4, 4), (128, 128, 4, 4), (128, 128, 8, 4), (64, 256, 4, 3),
                (128, 256, 4, 3), (256, 128, 8, 3)]
    gemv_tiles = [(128, 16, 2), (256, 16, 2), (64, 16, 1), (128, 8, 2), (128, 16, 4), (256, 16, 4)]  # block_n, rows, warps
    gemv_rows_tiles = [(128, 8, 2), (64, 8, 1), (256, 8, 4), (128, 16, 2), (128, 4, 2)]
    fp8_tiles = [(64, 256, 4), (128, 128, 4), (64, 128, 4), (32, 256, 4), (128, 256, 8)]
    fp8_gemv_tiles = [(16, 512, 4), (8, 512, 2), (8, 1024, 4), (16, 256, 2), (32, 256, 4), (32, 512, 8), (4, 1024, 2)]
    candidates: list[tuple[str, KernelConfig]] = []
    block_m = max(16, min(128, triton.next_power_of_2(m)))
    if m <= 128 and "w4a16" in formats:  # row tiles under 64 take mma.sync, 64 and up wgmma
        for w4_block_m in sorted({min(16, block_m), min(32, block_m), block_m}):
            for block_n, block_k, warps, stages in w4_tiles:
                for split in (0, 2, 4) if m <= 16 else (0, 2):
                    candidates.append(("w4a16", W4A16Config(w4_block_m, block_n, block_k, warps, stages, split)))
    if m == 1 and formats & {"w4a16", "w4a16-gemv"}:  # the CUDA-core GEMV
        for block_n, packed_rows, warps in gemv_tiles:
            for stages in (2, 3):  # loads through shared memory, stages - 1 steps ahead (1: registers)
                for split in (0, 4, 8):
                    candidates.append(("w4a16", W4A16GemvConfig(block_n, packed_rows, warps, stages, split)))
    if 1 < m <= 8 and formats & {"w4a16", "w4a16-gemv"}:  # the GEMV with several rows per dequantized tile
        for block_n, packed_rows, warps in gemv_rows_tiles:
            for block_m in sorted({min(m, 2), min(triton.next_power_of_2(m), 4)}):
                for split in (0, 8):
                    candidates.append(("w4a16", W4A16GemvConfig(block_n, packed_rows, warps, 3, split,
                                                                 block_m=block_m)))
    if m == 1 and formats & {"fp8", "fp8-gemv"}:  # the weight-only FP8 GEMV
        for block_n, block_k, warps in fp8_gemv_tiles:
            for stages in (3, 4):
                candidates.append(("fp8", Fp8GemvConfig(block_n, block_k, warps, stages)))
    if "fp8" in formats:
        for block_n, block_k, warps in fp8_tiles:
            for split in (0, 1, 2) if m <= 64 else (1,):
                candidates.append(("fp8", Fp8Config(block_m, block_n, block_k, warps, 4, split)))
    if "defaults" in formats:
        defaults: list[tuple[str, KernelConfig]] = [("fp8", fp8_default_config(m))]
        if m == 1:
            defaults.append(("fp8", FP8_GEMV_DEFAULT))
        if m in GEMV_CONFIGS:
            defaults.append(("w4a16", GEMV_CONFIGS[m]))
        if 1 < m <= 128:  # the tensor-core kernel's tiles, also where the GEMV is the default
            defaults.append(("w4a16", w4a16_default_config(m)))
        for fmt, config in defaults:
            candidates += [(fmt, config), (fmt, replace(config, reduce_in_kernel=not config.reduce_in_kernel))]
    return list(dict.fromkeys(candidates))  # a default that is also a listed tile is timed once


def interleaved_us(graphs: list[tuple[torch.cuda.CUDAGraph, int]], passes: int = SWEEP_PASSES) -> list[float]:
    """µs per call of each captured (graph, calls in it): the median of `passes` rounds, each round in a new
    random order. Timed back to back in a fixed order, the first of two candidates tended to measure slower
    (the same compiled kernel: 38.6 then 35.0 µs), so no candidate always follows the same one."""
    rng = random.Random(0)
    times: list[list[float]] = [[] for _ in graphs]
    order = list(range(len(graphs)))
    for _ in range(passes):
        rng.shuffle(order)
        for index in order:
            graph, calls = graphs[index]
            times[index].append(1e6 * cuda_time_s(graph.replay, warmup=1, repeat=3) / calls)
    return [statistics.median(samples) for samples in times]


def sweep_rows(batches: list[int], formats: list[str]) -> list[dict]:
    """Every sweep candidate at each batch on the four 8B GEMMs, timed against bf16 in the same rounds."""
    rows = []
    for name, (k, n) in LLAMA_8B_GEMMS.items():
        copies = weight_copies(k, n)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            timed: list[tuple[str, KernelConfig, float]] = []
            graphs = [(captured([gemm_calls("bf16", x, w) for w in copies]), len(copies))]
            for fmt, config in sweep_candidates(m, set(formats)):
                try:
                    graph = captured([gemm_calls(fmt, x, w, config) for w in copies])
                    error = check(fmt, x, copies[0], config)
                except Exception as exc:  # a tile that does not fit in shared memory, etc.
                    print(f"{name} M={m} {fmt} {config}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
                    continue
                graphs.append((graph, len(copies)))
                timed.append((fmt, config, error))
            bf16, *candidate_us = interleaved_us(graphs)
            rows += [{"gemm": name, "M": m, "format": fmt, "config": str(config), "us": us, "x_bf16": bf16 / us,
                      "err": error} for (fmt, config, error), us in zip(timed, candidate_us, strict=True)]
            del graphs
        del copies
        torch.cuda.empty_cache()
    return rows


def decode_rows(model: str, formats: list[str], batches: list[int], root: Path, prompt_len: int,
                new_tokens: int, bandwidth: float) -> list[dict]:
    rows = []
    for fmt in formats:
        folder, quantization = quantized_model_folder(model, fmt, root)
        config = EngineConfig(model=str(folder), dtype="bfloat16", seed=0, max_num_seqs=max(batches),
                              max_model_len=prompt_len + new_tokens + 8, quantization=quantization)
        engine = LLMEngine(config)
        qkv = engine.core.model_runner.model.model.layers[0].self_attn.qkv_proj
        stored = next(p.dtype for n, p in qkv.named_parameters() if n != "bias")
        if fmt != "bf16" and stored == torch.bfloat16:  # e.g. a runner that does not pass --quantization on
            print(f"{fmt}: the engine loaded bf16 weights; skipped", file=sys.stderr)
            engine.shutdown()
            continue
        vocab = token_id_limit(folder)
        weights = weight_bytes(engine)
        decode_ms_per_token(engine, 1, prompt_len, 2, vocab)  # warm-up
        for batch in batches:
            row = decode_ms_per_token(engine, batch, prompt_len, new_tokens, vocab)
            roofline_ms = 1e3 * weights / (bandwidth * 1e9)
            rows.append({"format": fmt, "weight_GB": weights / 1e9, **row, "tokens/s": 1e3 * batch / row["ms_per_step"],
                         "roofline_ms": roofline_ms, "%roofline": 100 * roofline_ms / row["ms_per_step"]})
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    base = {r["batch"]: r["tokens/s"] for r in rows if r["format"] == "bf16"}
    for row in rows:
        row["x_bf16"] = row["tokens/s"] / base[row["batch"]] if row["batch"] in base else None
    return rows


def layer_totals(rows: list[dict]) -> list[dict]:
    """Sweep rows summed over a layer's GEMMs, per (M, format, config) that ran on all of them, fastest first."""
    gemms = len(LLAMA_8B_GEMMS)
    totals: dict[tuple[int, str, str], list[dict]] = {}
    for row in rows:
        totals.setdefault((row["M"], row["format"], row["config"]), []).append(row)
    layers = [{"M": m, "format": fmt, "config": config, "us": sum(r["us"] for r in parts),
               "bf16_us": sum(r["us"] * r["x_bf16"] for r in parts), "max_err": max(r["err"] for r in parts)}
              for (m, fmt, config), parts in totals.items() if len(parts) == gemms]
    return sorted(layers, key=lambda r: (r["M"], r["format"], r["us"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemm-batches", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--skip-gemm", action="store_true")
    parser.add_argument("--stack-batches", default="1,16,64",
                        help="batches of the decode-GEMM stack ('' to skip)")
    parser.add_argument("--stack-model", choices=sorted(STACK_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--stack-formats", default=",".join(STACK_FORMATS))
    parser.add_argument("--sweep-batches", default="", help="sweep Triton tile configs at these batches")
    parser.add_argument("--sweep-formats", default="w4a16,fp8", help="w4a16, w4a16-gemv (the GEMV only), fp8, fp8-gemv (the GEMV only), defaults (each default tile, with and "
                             "without the in-kernel split sum)")
    parser.add_argument("--decode", action="store_true", help="also time end-to-end decode per format")
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--formats", default="bf16,fp8,fp8-channel,fp8-online,awq,gptq,compressed-tensors",
                        help=f"bf16, fp8-online, or any of {', '.join(QUANTIZED_FORMATS)}")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--model-root", default=str(Path(tempfile.gettempdir()) / "kubellm-bench-models"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    payload: dict = {"command": " ".join(sys.argv)}
    if args.sweep_batches:
        payload["sweep"] = sweep_rows([int(b) for b in args.sweep_batches.split(",")], args.sweep_formats.split(","))
        print_table(payload["sweep"], "Triton tile sweep (µs per GEMM, CUDA graph)")
        payload["sweep_layers"] = layer_totals(payload["sweep"])
        print_table(payload["sweep_layers"], "Triton tile sweep: the four GEMMs of a layer, fastest first per M and format")
        save_json(args.out, payload)
    if not args.skip_gemm:
        payload["gemm"] = gemm_rows([int(b) for b in args.gemm_batches.split(",")])
        print_table(payload["gemm"], f"Llama-3.1-8B GEMMs, bf16 vs W4A16 (group {GROUP_SIZE}) vs FP8 (per token), "
                                     "µs per GEMM in a CUDA graph, weights cycled past L2")
        save_json(args.out, payload)
    if args.stack_batches:
        payload["decode_gemm_stack"] = decode_stack_rows(args.stack_model, tuple(args.stack_formats.split(",")),
                                                         [int(b) for b in args.stack_batches.split(",")])
        print_table(payload["decode_gemm_stack"], f"{args.stack_model} decode step's GEMMs, ms per step")
    if args.decode:
        bandwidth = copy_bandwidth_gbs()
        payload["copy_bandwidth_gbs"] = bandwidth
        payload["decode"] = decode_rows(args.model, args.formats.split(","), [int(b) for b in args.batches.split(",")],
                                        Path(args.model_root), args.prompt_len, args.new_tokens, bandwidth)
        print_table(payload["decode"], f"decode, {args.model}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    save_json(args.out, payload)


if __name__ == "__main__":
    main()
