"""Lower bound on the wall time of an offline workload, for any engine on one GPU.

    bytes = steps * W + kv_bytes_per_token * sum_i sum_{t < out_i} (in_i + t)
    flops = 2 * (W / dtype_bytes) * sum_i (in_i + out_i)
    T_roofline = max(bytes / copy_bandwidth, flops / matmul_peak)

W: the weight bytes one forward pass reads (all but the input embedding; for
MoE models every expert, which a batch of many sequences routes to).
steps: decode steps needed at max_num_seqs sequences per step,
max(longest output, total output / max_num_seqs); every step reads W once.
Each generated token reads the K/V of every token before it. Prefill weight
reads are left out, so this is a bound no engine can beat, not an estimate.

    python -m benchmarks.roofline --model llama-3.1-8b --workload mixed --bandwidth-gbs 4248 --peak-tflops 779
"""

from __future__ import annotations

import argparse
import math

from benchmarks.workloads import MODEL_SHAPES, Request, make_workload
from engine.testing.shapes import shape_kwargs


def model_bytes(shape: str, dtype_bytes: int = 2) -> tuple[int, int]:
    """(weight bytes read per forward pass, KV-cache bytes per token) of a benchmark shape."""
    cfg = shape_kwargs(*MODEL_SHAPES[shape])
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if num_experts:  # Qwen3-MoE names the expert width moe_intermediate_size, Mixtral intermediate_size
        expert = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        mlp = num_experts * (3 * hidden * expert + hidden)  # experts and the router
    else:
        mlp = 3 * hidden * cfg["intermediate_size"]
    per_layer = attention + mlp + 2 * hidden
    weights = layers * per_layer + hidden + hidden * vocab  # final norm + lm_head (tied or not, it is read)
    return weights * dtype_bytes, 2 * layers * kv_heads * head_dim * dtype_bytes


def roofline_seconds(requests: list[Request], weight_bytes: int, kv_bytes_per_token: int, max_num_seqs: int,
                     bandwidth_gbs: float, peak_tflops: float, dtype_bytes: int = 2) -> dict:
    outputs = [r.output_len for r in requests]
    steps = max(max(outputs), math.ceil(sum(outputs) / max_num_seqs))
    kv_reads = sum(len(r.prompt_token_ids) * r.output_len + r.output_len * (r.output_len - 1) // 2 for r in requests)
    total_bytes = steps * weight_bytes + kv_bytes_per_token * kv_reads
    tokens = sum(len(r.prompt_token_ids) + r.output_len for r in requests)
    flops = 2 * (weight_bytes / dtype_bytes) * tokens
    memory_s, compute_s = total_bytes / (bandwidth_gbs * 1e9), flops / (peak_tflops * 1e12)
    return {"steps": steps, "bytes": total_bytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s,
            "roofline_s": max(memory_s, compute_s), "roofline_output_tok_s": sum(outputs) / max(memory_s, compute_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--workload", choices=["mixed", "fixed"], default="mixed")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--bandwidth-gbs", type=float, required=True, help="measured device copy bandwidth")
    parser.add_argument("--peak-tflops", type=float, required=True, help="measured bf16 matmul rate")
    args = parser.parse_args()
    requests = make_workload(args.workload, vocab_size=1000)  # lengths only; ids do not matter here
    weights, kv_per_token = model_bytes(args.model)
    bound = roofline_seconds(requests, weights, kv_per_token, args.max_num_seqs, args.bandwidth_gbs, args.peak_tflops)
    print(f"{args.model} / {args.workload}: W = {weights / 1e9:.2f} GB, KV = {kv_per_token} B/token")
    for key, value in bound.items():
        print(f"{key:>22}: {value:,.3f}" if isinstance(value, float) else f"{key:>22}: {value:,}")


if __name__ == "__main__":
    main()
