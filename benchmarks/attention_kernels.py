"""Micro-benchmark of the Triton attention kernels against torch SDPA and the torch reference.

Decode is memory-bound: its figure of merit is KV bytes read per second against
the device copy bandwidth measured in the same run. Prefill is compute-bound:
TFLOP/s of the causal attention it does. SDPA runs on the same problem laid out
densely (no paging, equal lengths), i.e. what the paging costs, if anything.

    python -m benchmarks.attention_kernels --out results/kernels.json [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton.testing

import kernels
from benchmarks.common import copy_bandwidth_gbs, print_table, save_json
from kernels import reference
from kernels.attention import LaunchConfig, default_decode_config, default_prefill_config
from kernels.random_inputs import PagedProblem, make_paged_problem
from kernels.reference import FP8_DTYPE, FP8_MAX, quantize_kv

SHAPES = {"llama8b": (32, 8, 128), "qwen0.5b": (14, 2, 64)}  # num_heads, num_kv_heads, head_dim
BLOCK_SIZE = 16


def cache_of(p: PagedProblem, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(k_cache, v_cache, scale) of the problem: its bf16 cache, or that cache stored as FP8 with one scale
    (the cache's amax / 448, as a calibrated --kv-cache-dtype fp8 cache would be)."""
    if not fp8:
        return p.k_cache, p.v_cache, None
    scale = (torch.maximum(p.k_cache.abs().amax(), p.v_cache.abs().amax()).float() / FP8_MAX).reshape(1)
    return quantize_kv(p.k_cache, FP8_DTYPE, scale), quantize_kv(p.v_cache, FP8_DTYPE, scale), scale


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def dense_kv(p: PagedProblem, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paged cache of equal-length sequences gathered into [B, num_kv_heads, seq_len, head_dim]."""
    gather = [reference.gather_kv(c, p.block_tables[b], seq_len) for c in (p.k_cache, p.v_cache)
              for b in range(p.seq_lens.shape[0])]
    batch = p.seq_lens.shape[0]
    k = torch.stack(gather[:batch]).transpose(1, 2).contiguous()
    v = torch.stack(gather[batch:]).transpose(1, 2).contiguous()
    return k, v


def decode_row(shape: str, batch: int, context: int, bandwidth: float, config: LaunchConfig | None = None,
               with_reference: bool = False, fp8: bool = False) -> dict:
    num_heads, num_kv_heads, head_dim = SHAPES[shape]
    p = make_paged_problem([context] * batch, [1] * batch, num_heads, num_kv_heads, head_dim,
                           BLOCK_SIZE, torch.bfloat16, "cuda")
    k_cache, v_cache, scale = cache_of(p, fp8)
    run = lambda: kernels.paged_decode_attention(p.q, k_cache, v_cache, p.block_tables, p.seq_lens,  # noqa: E731
                                                 p.scale, config=config, k_scale=scale, v_scale=scale)
    triton_ms = bench_ms(run)
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * k_cache.element_size()
    row = {"shape": shape, "batch": batch, "context": context, "triton_us": 1e3 * triton_ms,
           "GB/s": kv_bytes / triton_ms / 1e6, "%copy_bw": 100 * kv_bytes / triton_ms / 1e6 / bandwidth}
    if batch * context <= 256 * 4096:
        k, v = dense_kv(p, context)
        q = p.q.unsqueeze(2)  # [B, num_heads, 1, head_dim]
        sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=p.scale, enable_gqa=True))
        row.update(sdpa_us=1e3 * sdpa_ms, speedup_vs_sdpa=sdpa_ms / triton_ms)
    if with_reference:
        ref_ms = bench_ms(lambda: reference.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables,
                                                                   p.seq_lens, p.scale))
        row.update(reference_us=1e3 * ref_ms, speedup_vs_reference=ref_ms / triton_ms)
    return row


def prefill_row(shape: str, name: str, seq_lens: list[int], query_lens: list[int],
                config: LaunchConfig | None = None, fp8: bool = False) -> dict:
    num_heads, num_kv_heads, head_dim = SHAPES[shape]
    p = make_paged_problem(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, BLOCK_SIZE,
                           torch.bfloat16, "cuda")
    k_cache, v_cache, scale = cache_of(p, fp8)
    run = lambda: kernels.paged_prefill_attention(p.q, k_cache, v_cache, p.block_tables,  # noqa: E731
                                                  p.query_start_loc, p.seq_lens, p.scale, config=config,
                                                  k_scale=scale, v_scale=scale)
    triton_ms = bench_ms(run)
    # Causal: query i of a sequence of length s with q queries attends to s - q + i + 1 keys.
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for s, q in zip(seq_lens, query_lens))
    flops = 4 * pairs * num_heads * head_dim
    row = {"shape": shape, "case": name, "tokens": sum(query_lens), "triton_us": 1e3 * triton_ms,
           "TFLOP/s": flops / triton_ms / 1e9}
    if len(set(seq_lens)) == 1 and seq_lens == query_lens:  # equal whole prompts: SDPA flash comparable
        k, v = dense_kv(p, seq_lens[0])
        q = p.q.view(len(seq_lens), seq_lens[0], num_heads, head_dim).transpose(1, 2)
        sdpa_ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=p.scale,
                                                                  enable_gqa=True))
        row.update(sdpa_us=1e3 * sdpa_ms, speedup_vs_sdpa=sdpa_ms / triton_ms)
    return row


PREFILL_CASES = {
    "1x4096 prompt": ([4096], [4096]),
    "8x1024 prompts": ([1024] * 8, [1024] * 8),
    "2048 chunk after 14k prefix": ([16384], [2048]),
    "255 decodes@600 + 512 chunk": ([600] * 255 + [512], [1] * 255 + [512]),
}


def decode_sweep(bandwidth: float, fp8: bool) -> list[dict]:
    rows = []
    for batch, context in [(1, 32768), (32, 4096), (256, 512), (256, 2048)]:
        for block_n, warps, stages in itertools.product((32, 64, 128), (2, 4, 8), (2, 3)):
            config = LaunchConfig(block_n=block_n, num_warps=warps, num_stages=stages)
            row = decode_row("llama8b", batch, context, bandwidth, config, fp8=fp8)
            rows.append({**asdict(config), **{k: row[k] for k in ("batch", "context", "triton_us", "%copy_bw")}})
    return rows


def prefill_sweep() -> list[dict]:
    rows = []
    for name in ("1x4096 prompt", "255 decodes@600 + 512 chunk"):
        for rows_per_tile, block_n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
            config = LaunchConfig(block_n=block_n, num_warps=warps, num_stages=stages, block_q=rows_per_tile // 4)
            try:
                row = prefill_row("llama8b", name, *PREFILL_CASES[name], config=config)
            except Exception as error:  # out of shared memory for big tiles: record and go on
                row = {"case": name, "triton_us": float("nan"), "TFLOP/s": float("nan"), "error": str(error)[:80]}
            rows.append({**asdict(config), "case": name, "triton_us": row["triton_us"], "TFLOP/s": row["TFLOP/s"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile sizes, warps and stages")
    parser.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                        help="fp8: the Triton kernels read an FP8 cache (SDPA stays on the bf16 one)")
    args = parser.parse_args()
    fp8 = args.kv_cache_dtype == "fp8"
    cache = "FP8 (e4m3) cache" if fp8 else "bf16 cache"
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.attention_kernels needs a CUDA GPU")

    bandwidth = copy_bandwidth_gbs()
    print(f"device copy bandwidth: {bandwidth:,.0f} GB/s (read + write)")
    decode = [decode_row("llama8b", 32, 1024, bandwidth, with_reference=True, fp8=fp8)]
    decode += [decode_row("llama8b", b, c, bandwidth, fp8=fp8) for b, c in
               [(1, 1024), (1, 4096), (1, 32768), (8, 4096), (32, 4096), (128, 1024), (256, 512), (256, 2048)]]
    decode += [decode_row("qwen0.5b", b, c, bandwidth, fp8=fp8) for b, c in [(1, 4096), (256, 1024)]]
    print_table(decode, f"paged decode attention, bf16 queries, {cache}, block {BLOCK_SIZE} "
                        f"(default configs: {default_decode_config(128, fp8)})")
    prefill = [prefill_row(shape, name, *PREFILL_CASES[name], fp8=fp8) for shape in SHAPES for name in PREFILL_CASES]
    print_table(prefill, f"paged prefill attention, bf16 queries, {cache}, block {BLOCK_SIZE} "
                         f"(default config for GQA 4: {default_prefill_config(128, 4)})")
    results = {"copy_bandwidth_gbs": bandwidth, "kv_cache_dtype": args.kv_cache_dtype, "decode": decode,
               "prefill": prefill}
    if args.sweep:
        results["decode_sweep"] = decode_sweep(bandwidth, fp8)
        print_table(sorted(results["decode_sweep"], key=lambda r: (r["batch"], r["triton_us"])), "decode sweep")
        results["prefill_sweep"] = prefill_sweep()
        print_table(sorted(results["prefill_sweep"], key=lambda r: (r["case"], r["triton_us"])), "prefill sweep")
    save_json(args.out, results)


if __name__ == "__main__":
    main()
