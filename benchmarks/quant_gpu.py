"""Quantized GEMMs and decode on one GPU: W4A16 and FP8 against bf16 in the same run.

1. GEMM: y = x W^T at Llama-3.1-8B's four linear shapes for batch 1..256, timed with
   CUDA events: bf16 torch matmul, the W4A16 Triton kernel (group 128, zero points),
   and FP8 (per-token activation quantization + the FP8 GEMM, and the GEMM alone).
   Each quantized result is checked against its torch reference before it is timed.
2. Decode (--decode): random-weight models of a factory shape written in each format by
   engine.testing.quantized (the formats' published layouts), served by LLMEngine;
   ms per decode step at the given batch sizes, as benchmarks.latency measures it.
   The 70B shape is written straight in W4A16 (no 141 GB bf16 copy on disk).

    python -m benchmarks.quant_gpu --out results/quant_gemm.json
    python -m benchmarks.quant_gpu --skip-gemm --decode --model llama-3.1-8b --formats bf16,fp8,awq --out r.json
    python -m benchmarks.quant_gpu --skip-gemm --decode --model llama-3.1-70b --formats awq --batches 1,32
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import kernels
from benchmarks.common import copy_bandwidth_gbs, cuda_time_s, print_table, save_json
from benchmarks.latency import decode_ms_per_token, weight_bytes
from benchmarks.workloads import MODEL_SHAPES, model_folder, token_id_limit
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.testing.quantized import QUANTIZED_FORMATS, quantize_model_folder, write_random_quantized_folder
from kernels import quant_reference as ref

LLAMA_8B_GEMMS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
GROUP_SIZE = 128


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).norm() / expected.float().norm())


def gemm_rows(batches: list[int]) -> list[dict]:
    rows = []
    for name, (k, n) in LLAMA_8B_GEMMS.items():
        weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        qweight, scales, zeros = ref.quantize_w4(weight, GROUP_SIZE, zero_point=True)
        fp8_weight, fp8_scale = ref.quantize_fp8_per_channel(weight)
        for m in batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w4_error = relative_error(kernels.w4a16_matmul(x, qweight, scales, zeros, GROUP_SIZE),
                                      ref.w4a16_matmul(x, qweight, scales, zeros, GROUP_SIZE))
            x_q, x_scale = kernels.quantize_fp8_per_token(x)
            fp8_error = relative_error(kernels.fp8_matmul(x_q, x_scale, fp8_weight, fp8_scale, torch.bfloat16),
                                       ref.fp8_matmul(x_q, x_scale, fp8_weight, fp8_scale, torch.bfloat16))
            bf16_us = 1e6 * cuda_time_s(lambda: x @ weight.t())
            w4_us = 1e6 * cuda_time_s(lambda: kernels.w4a16_matmul(x, qweight, scales, zeros, GROUP_SIZE))
            fp8_gemm_us = 1e6 * cuda_time_s(
                lambda: kernels.fp8_matmul(x_q, x_scale, fp8_weight, fp8_scale, torch.bfloat16))

            def fp8_with_quantization() -> torch.Tensor:
                q, s = kernels.quantize_fp8_per_token(x)
                return kernels.fp8_matmul(q, s, fp8_weight, fp8_scale, torch.bfloat16)

            fp8_us = 1e6 * cuda_time_s(fp8_with_quantization)
            rows.append({
                "gemm": name, "M": m, "K": k, "N": n, "bf16_us": bf16_us,
                "w4a16_us": w4_us, "w4a16_speedup": bf16_us / w4_us, "w4a16_weight_GB/s": weight_gbs(qweight, w4_us),
                "fp8_us": fp8_us, "fp8_speedup": bf16_us / fp8_us, "fp8_gemm_only_us": fp8_gemm_us,
                "bf16_weight_GB/s": weight_gbs(weight, bf16_us), "w4a16_err": w4_error, "fp8_err": fp8_error,
            })
        del weight, qweight, scales, zeros, fp8_weight, fp8_scale
        torch.cuda.empty_cache()
    return rows


def weight_gbs(weight: torch.Tensor, microseconds: float) -> float:
    return weight.numel() * weight.element_size() / (microseconds * 1e-6) / 1e9


def quantized_folder(model: str, fmt: str, root: Path) -> tuple[Path, str | None]:
    """(folder, --quantization) for a format name: bf16, fp8-online, or one of QUANTIZED_FORMATS."""
    if fmt == "bf16":
        return model_folder(model, root), None
    if fmt == "fp8-online":
        return model_folder(model, root), "fp8"
    target = root / f"{model}-{fmt}"
    if not (target / "model.safetensors.index.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        family, size = MODEL_SHAPES[model]
        if model == "llama-3.1-70b":  # 141 GB in bf16: never write that
            write_random_quantized_folder(target, family, size, fmt, GROUP_SIZE, device="cuda")
        else:
            quantize_model_folder(model_folder(model, root), target, fmt, GROUP_SIZE, device="cuda")
    return target, None


def decode_rows(model: str, formats: list[str], batches: list[int], root: Path, prompt_len: int,
                new_tokens: int, bandwidth: float) -> list[dict]:
    rows = []
    for fmt in formats:
        folder, quantization = quantized_folder(model, fmt, root)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gemm-batches", default="1,2,4,8,16,32,64,128,256")
    parser.add_argument("--skip-gemm", action="store_true")
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
    if not args.skip_gemm:
        payload["gemm"] = gemm_rows([int(b) for b in args.gemm_batches.split(",")])
        print_table(payload["gemm"], f"Llama-3.1-8B GEMMs, bf16 vs W4A16 (group {GROUP_SIZE}) vs FP8 (per token)")
    if args.decode:
        bandwidth = copy_bandwidth_gbs()
        payload["copy_bandwidth_gbs"] = bandwidth
        payload["decode"] = decode_rows(args.model, args.formats.split(","), [int(b) for b in args.batches.split(",")],
                                        Path(args.model_root), args.prompt_len, args.new_tokens, bandwidth)
        print_table(payload["decode"], f"decode, {args.model}, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    save_json(args.out, payload)


if __name__ == "__main__":
    main()
