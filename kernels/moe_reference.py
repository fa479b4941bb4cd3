"""Torch reference of the fused mixture-of-experts MLP, and its CPU path.

Semantics shared with the Triton kernel in kernels/moe.py:

    out[t] = sum_j weights[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])),  e = ids[t, j]

with w13[e] = [gate_e; up_e] (the two projections stacked, [2 * I, H]) and
w2[e] = down_e ([H, I]). The loop runs once per expert that some token chose,
in the order and rounding Hugging Face's MoE blocks use, so fp32 results match
transformers bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu}


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2 * I, H]: gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, K] float32 routing weights
    topk_ids: torch.Tensor,  # [T, K] expert of each (token, choice)
    activation: str = "silu",
) -> torch.Tensor:
    """[T, H]: each token's top-K experts' gated MLPs, weighted and summed."""
    act = ACTIVATIONS[activation]
    out = torch.zeros_like(x)
    for expert in torch.unique(topk_ids).tolist():
        tokens, choice = torch.where(topk_ids == expert)
        gate, up = F.linear(x[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(act(gate) * up, w2[expert])
        y = y * topk_weights[tokens, choice, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
