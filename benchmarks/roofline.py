"""Lower bounds on the wall time of an offline workload, for any engine on one GPU.

Workload bound (loose): the whole workload at once.

    bytes = steps * W + kv_bytes_per_token * sum_i sum_{t < out_i} (in_i + t)
    flops = 2 * (W / dtype_bytes) * sum_i (in_i + out_i)
    T_roofline = max(bytes / copy_bandwidth, flops / matmul_peak)

W: the weight bytes one forward pass reads (all but the input embedding; for
MoE models every expert, which a batch of many sequences routes to).
steps: decode steps needed at max_num_seqs sequences per step,
max(longest output, total output / max_num_seqs); every step reads W once.
Each generated token reads the K/V of every token before it. Prefill weight
reads are left out, so this is a bound no engine can beat, not an estimate.
It is loose because it lets one step's compute hide another's memory traffic:
prefill steps are compute-bound, decode steps bound by bytes.

Step bound (tighter): kubellm's schedule for the workload (engine.scheduler's
policy, every request arriving at t=0, KV blocks never short), each step taking
max(its bytes / copy_bandwidth, its flops / matmul_peak):

    bytes = W (MoE: the experts its tokens can reach) + kv_bytes_per_token * sum over its chunks of (start + tokens)
    flops = 2 * P_active * tokens + 2 * P_lm_head * sampled rows + 4 * layers * heads * head_dim * attended pairs

A chunk of tokens [start, start + n) of a sequence reads the start tokens' K/V
before it and writes its own, and its queries attend n * start + n (n + 1) / 2
(query, key) pairs (causal). Activations are left out, so this stays a bound for
this schedule; it is no bound for a smarter one.

    python -m benchmarks.roofline --model llama-3.1-8b --workload mixed --bandwidth-gbs 4248 --peak-tflops 779
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from dataclasses import dataclass

from benchmarks.workloads import MODEL_SHAPES, Request, make_workload
from engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS, EngineConfig
from engine.testing.shapes import shape_kwargs

# The throughput targets ask for this share of a roofline bound.
TARGET_SHARE = 0.6


@dataclass(frozen=True)
class ModelCost:
    """What a forward pass of a benchmark shape reads and computes."""

    weight_bytes: int  # read per forward pass: all but the input embedding, every expert
    lm_head_bytes: int  # of weight_bytes: multiplied by sampled rows only
    expert_bytes: int  # of weight_bytes: one expert of every MoE layer (0: a dense model)
    num_experts: int  # 0: a dense model
    top_k: int  # experts per token
    kv_bytes_per_token: int
    attention_flops_per_pair: int  # QK^T and PV over every layer for one (query, key) pair
    dtype_bytes: int = 2

    def step_bytes_flops(self, tokens: int, sampled: int, kv_tokens: int, pairs: int) -> tuple[float, float]:
        """Bytes and flops of one step of `tokens` tokens, `sampled` of them sampled, touching the
        K/V of `kv_tokens` tokens, its queries attending `pairs` (query, key) pairs."""
        unread = self.num_experts * (1 - self.top_k / self.num_experts) ** tokens if self.num_experts else 0.0
        weight_bytes = self.weight_bytes - unread * self.expert_bytes
        inactive = (self.num_experts - self.top_k) * self.expert_bytes
        per_token = (self.weight_bytes - self.lm_head_bytes - inactive) / self.dtype_bytes
        flops = 2 * per_token * tokens + 2 * self.lm_head_bytes / self.dtype_bytes * sampled
        return weight_bytes + self.kv_bytes_per_token * kv_tokens, flops + self.attention_flops_per_pair * pairs


def model_cost(shape: str, dtype_bytes: int = 2) -> ModelCost:
    """The ModelCost of a benchmark shape, from its config."""
    cfg = shape_kwargs(*MODEL_SHAPES[shape])
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    num_experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    expert = 0
    if num_experts:  # Qwen3-MoE names the expert width moe_intermediate_size, Mixtral intermediate_size
        expert = 3 * hidden * (cfg.get("moe_intermediate_size") or cfg["intermediate_size"])
        mlp = num_experts * (expert + hidden)  # experts and the router
    else:
        mlp = 3 * hidden * cfg["intermediate_size"]
    per_layer = attention + mlp + 2 * hidden
    weights = layers * per_layer + hidden + hidden * vocab  # final norm + lm_head (tied or not, it is read)
    return ModelCost(
        weight_bytes=weights * dtype_bytes,
        lm_head_bytes=hidden * vocab * dtype_bytes,
        expert_bytes=layers * expert * dtype_bytes,
        num_experts=num_experts,
        top_k=cfg.get("num_experts_per_tok", 0),
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        attention_flops_per_pair=4 * layers * heads * head_dim,
        dtype_bytes=dtype_bytes,
    )


def roofline_seconds(requests: list[Request], cost: ModelCost, max_num_seqs: int, bandwidth_gbs: float,
                     peak_tflops: float) -> dict:
    """The workload bound (see the module docstring)."""
    weight_bytes, kv_bytes_per_token, dtype_bytes = cost.weight_bytes, cost.kv_bytes_per_token, cost.dtype_bytes
    outputs = [r.output_len for r in requests]
    steps = max(max(outputs), math.ceil(sum(outputs) / max_num_seqs))
    kv_reads = sum(len(r.prompt_token_ids) * r.output_len + r.output_len * (r.output_len - 1) // 2 for r in requests)
    total_bytes = steps * weight_bytes + kv_bytes_per_token * kv_reads
    tokens = sum(len(r.prompt_token_ids) + r.output_len for r in requests)
    flops = 2 * (weight_bytes / dtype_bytes) * tokens
    memory_s, compute_s = total_bytes / (bandwidth_gbs * 1e9), flops / (peak_tflops * 1e12)
    return {"steps": steps, "bytes": total_bytes, "flops": flops, "memory_s": memory_s, "compute_s": compute_s,
            "roofline_s": max(memory_s, compute_s), "roofline_output_tok_s": sum(outputs) / max(memory_s, compute_s)}


@dataclass(frozen=True)
class Chunk:
    """One sequence's part of a step: tokens [start, start + num_tokens); samples: it ends the sequence so far."""

    start: int
    num_tokens: int
    samples: bool


def simulate_schedule(requests: list[Request], max_num_seqs: int, max_num_batched_tokens: int) -> list[list[Chunk]]:
    """The steps engine.scheduler.Scheduler runs for requests that all arrive at once, with KV blocks never
    short (no preemption) and no prefix-cache hits.

    Each step: running sequences first, oldest first (a decode takes one token, a partly computed prompt
    the next chunk that fits the token budget), then waiting requests admitted in order while budget and
    max_num_seqs allow, their prompts chunked to the budget left. A sequence leaves once it sampled its
    output length.
    """
    prompt = [len(r.prompt_token_ids) for r in requests]
    computed, produced = [0] * len(requests), [0] * len(requests)
    waiting, running = deque(range(len(requests))), []
    steps = []
    while waiting or running:
        budget, work = max_num_batched_tokens, []
        for i in running:
            if not budget:
                break
            work.append((i, min(prompt[i] + produced[i] - computed[i], budget)))
            budget -= work[-1][1]
        while waiting and budget and len(running) < max_num_seqs:
            i = waiting.popleft()
            running.append(i)
            work.append((i, min(prompt[i], budget)))
            budget -= work[-1][1]
        chunks = []
        for i, num_tokens in work:
            samples = computed[i] + num_tokens == prompt[i] + produced[i]
            chunks.append(Chunk(computed[i], num_tokens, samples))
            computed[i] += num_tokens
            produced[i] += samples
        running = [i for i in running if produced[i] < requests[i].output_len]
        steps.append(chunks)
    return steps


def step_roofline_seconds(requests: list[Request], cost: ModelCost, max_num_seqs: int, max_num_batched_tokens: int,
                          bandwidth_gbs: float, peak_tflops: float) -> dict:
    """The step bound (see the module docstring): per simulated step, max(bytes / bandwidth, flops / peak)."""
    total_s = memory_s = compute_s = 0.0
    compute_bound_steps = 0
    steps = simulate_schedule(requests, max_num_seqs, max_num_batched_tokens)
    for chunks in steps:
        num_bytes, flops = cost.step_bytes_flops(
            tokens=sum(c.num_tokens for c in chunks),
            sampled=sum(c.samples for c in chunks),
            kv_tokens=sum(c.start + c.num_tokens for c in chunks),
            pairs=sum(c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) // 2 for c in chunks),
        )
        step_memory_s, step_compute_s = num_bytes / (bandwidth_gbs * 1e9), flops / (peak_tflops * 1e12)
        memory_s += step_memory_s
        compute_s += step_compute_s
        total_s += max(step_memory_s, step_compute_s)
        compute_bound_steps += step_compute_s > step_memory_s
    outputs = sum(r.output_len for r in requests)
    return {"steps": len(steps), "compute_bound_steps": compute_bound_steps, "memory_s": memory_s,
            "compute_s": compute_s, "roofline_s": total_s, "roofline_output_tok_s": outputs / total_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--workload", choices=["mixed", "fixed"], default="mixed")
    parser.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    parser.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS)
    parser.add_argument("--bandwidth-gbs", type=float, required=True, help="measured device copy bandwidth")
    parser.add_argument("--peak-tflops", type=float, required=True, help="measured bf16 matmul rate")
    args = parser.parse_args()
    requests = make_workload(args.workload, vocab_size=1000)  # lengths only; ids do not matter here
    cost = model_cost(args.model)
    bounds = {
        "workload": roofline_seconds(requests, cost, args.max_num_seqs, args.bandwidth_gbs, args.peak_tflops),
        "per step": step_roofline_seconds(requests, cost, args.max_num_seqs, args.max_num_batched_tokens,
                                          args.bandwidth_gbs, args.peak_tflops),
    }
    print(f"{args.model} / {args.workload}: W = {cost.weight_bytes / 1e9:.2f} GB, "
          f"KV = {cost.kv_bytes_per_token} B/token")
    for name, bound in bounds.items():
        print(f"\n{name} bound")
        for key, value in bound.items():
            print(f"{key:>22}: {value:,.3f}" if isinstance(value, float) else f"{key:>22}: {value:,}")
        print(f"{f'output tok/s at {TARGET_SHARE:.0%}':>22}: {TARGET_SHARE * bound['roofline_output_tok_s']:,.0f}")


if __name__ == "__main__":
    main()
