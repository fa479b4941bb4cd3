"""Where the batch-1 quantized GEMVs lose time: HBM streaming, L2 hits, and weights prefetched into L2.

For each Llama-3.1-8B GEMM at one row, in a CUDA graph:
1. cold: every call reads another copy of the weight (nothing in L2), as decode does;
2. hot: every call reads the same copy (the weight stays in L2 where it fits);
3. stream: a kernel that only streams the packed W4A16 weight with the GEMV's tiles and pipeline
   (no dequantization), cold: the byte rate the access pattern itself reaches;
4. behind: each call follows a spin kernel of SPIN_US (the attention and norms of a decode step,
   which leave HBM idle), with and without an L2 prefetch of the call's weight on a side stream,
   issued when the spin starts.

    python -m benchmarks.l2_probe --out l2_probe.json
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import triton
import triton.language as tl

import kernels
from benchmarks.common import print_table, save_json
from benchmarks.quant_gpu import LLAMA_8B_GEMMS, GemmWeights, gemm_calls, graph_us, weight_copies

SPIN_US = 8.0
PREFETCH_CHUNK = 64 << 10  # bytes per cp.async.bulk.prefetch.L2


@triton.jit
def _prefetch_l2_kernel(ptr, n_bytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    """Each thread asks the TMA unit to pull one CHUNK of bytes into L2 (no registers, no SM loads)."""
    offs = (tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    size = tl.minimum(n_bytes - offs, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r", [ptr.to(tl.pointer_type(tl.int8)) + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_l2(tensor: torch.Tensor) -> None:
    n_bytes = tensor.numel() * tensor.element_size()
    per_program = 32
    grid = (triton.cdiv(triton.cdiv(n_bytes, PREFETCH_CHUNK), per_program),)
    _prefetch_l2_kernel[grid](tensor, n_bytes, CHUNK=PREFETCH_CHUNK, PER_PROGRAM=per_program, num_warps=1)


@triton.jit
def _stream_kernel(w_ptr, out_ptr, N, rows_per_split, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   STAGES: tl.constexpr):
    """The GEMV's loads alone: [ROWS, BLOCK_N] int32 per step through the same pipeline, xor-reduced."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)
    start = pid_k * rows_per_split
    for r0 in tl.range(start, start + rows_per_split, ROWS, num_stages=STAGES):
        acc ^= tl.load(w_ptr + (r0 + offs_r)[:, None] * N + offs_n[None, :])
    tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(acc, axis=0))


def stream_call(qweight: torch.Tensor, out: torch.Tensor, splits: int) -> Callable[[], None]:
    rows, n = qweight.shape
    config = kernels.w4a16.DEFAULT_GEMV
    grid = (n // config.block_n, splits)
    return lambda: _stream_kernel[grid](qweight, out, n, rows // splits, ROWS=config.rows, BLOCK_N=config.block_n,
                                        STAGES=config.num_stages, num_warps=config.num_warps)


def spin_cycles() -> int:
    return int(SPIN_US * torch.cuda.get_device_properties(0).clock_rate / 1e3)


def behind_spin(call: Callable[[], object], side: Callable[[], object], other: torch.cuda.Stream
                ) -> Callable[[], object]:
    """call after a spin of SPIN_US; side runs on the stream `other` beside the spin, and call waits for both."""
    def run() -> object:
        main = torch.cuda.current_stream()  # the capture's own stream while capturing
        other.wait_stream(main)
        torch.cuda._sleep(spin_cycles())
        with torch.cuda.stream(other):
            side()
        main.wait_stream(other)
        return call()
    return run


def weight_tensors(fmt: str, w: GemmWeights) -> list[torch.Tensor]:
    if fmt == "bf16":
        return [w.bf16]
    if fmt == "w4a16":
        return [t for t in w.w4 if t is not None]
    return list(w.fp8)


def rows() -> list[dict]:
    table = []
    other = torch.cuda.Stream()
    for name, (k, n) in LLAMA_8B_GEMMS.items():
        copies = weight_copies(k, n)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        calls = 2 * len(copies)
        for fmt in ("bf16", "w4a16", "fp8"):
            cold = [gemm_calls(fmt, x, copies[i % len(copies)]) for i in range(calls)]
            prefetches = [lambda w=copies[i % len(copies)]: [prefetch_l2(t) for t in weight_tensors(fmt, w)]
                          for i in range(calls)]
            row = {"gemm": name, "format": fmt, "MB": sum(t.numel() * t.element_size()
                                                         for t in weight_tensors(fmt, copies[0])) / 1e6,
                   "cold_us": graph_us(cold), "hot_us": graph_us([gemm_calls(fmt, x, copies[0])] * calls),
                   "behind_spin_us": graph_us([behind_spin(call, lambda: None, other) for call in cold]),
                   "behind_spin_prefetched_us": graph_us([behind_spin(call, prefetch, other)
                                                          for call, prefetch in zip(cold, prefetches, strict=True)])}
            if fmt == "w4a16":
                out = torch.zeros(n, device="cuda", dtype=torch.int32)
                for splits in (1, 2, 4, 8):
                    if (k // 8) % (splits * kernels.w4a16.DEFAULT_GEMV.rows) == 0:
                        row[f"stream_split{splits}_us"] = graph_us(
                            [stream_call(copies[i % len(copies)].w4[0], out, splits) for i in range(calls)])
            table.append(row)
            print(row, flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    args = parser.parse_args()
    spin = graph_us([lambda: torch.cuda._sleep(spin_cycles())] * 64)
    print(f"spin alone: {spin:.2f} µs per call (asked {SPIN_US})")
    table = rows()
    print_table(table, "batch-1 GEMVs: cold, L2-hot, streamed, behind a spin with and without an L2 prefetch (µs)")
    if args.out:
        save_json(args.out, {"spin_us": spin, "rows": table})


if __name__ == "__main__":
    main()
