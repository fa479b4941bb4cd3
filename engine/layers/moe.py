"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks top_k experts per token.

Experts are held as two stacked parameters, w13 [E, 2 * I, H] (gate rows, then
up rows) and w2 [E, H, I], the layout the fused kernel reads. Tensor
parallelism splits every expert's intermediate dimension I across ranks, like
a dense MLP (w13 by rows, w2 by columns), and all-reduces the sum; each rank
holds all experts. The router is replicated.

Checkpoints store one tensor per expert and projection
(`experts.3.gate_proj.weight`, or Mixtral's `experts.3.w1.weight`); a model
names its projections (`expert_projections`) and the loader maps them onto the
stacked parameters with the two functions below.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.layers.tensor_parallel import all_reduce, divide, tp_rank_and_size
from engine.layers.weights import check_shape
from engine.model_config import MoeConfig
from kernels import moe_reference

# Checkpoint projection name -> (stacked parameter, which part: 0 gate, 1 up, 2 down).
ExpertProjections = dict[str, tuple[str, int]]
QWEN_EXPERT_PROJECTIONS: ExpertProjections = {
    "gate_proj": ("w13_weight", 0), "up_proj": ("w13_weight", 1), "down_proj": ("w2_weight", 2),
}
MIXTRAL_EXPERT_PROJECTIONS: ExpertProjections = {"w1": ("w13_weight", 0), "w3": ("w13_weight", 1), "w2": ("w2_weight", 2)}
_EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED_PARAM = re.compile(r"\.experts\.(w13_weight|w2_weight)$")


def expert_param_name(name: str, projections: ExpertProjections) -> tuple[str, tuple[int, int]] | None:
    """`...experts.<e>.<proj>.weight` -> (`...experts.<stacked>`, (e, part)); None for any other tensor."""
    match = _EXPERT_TENSOR.search(name)
    if match is None or match.group(2) not in projections:
        return None
    stacked, part = projections[match.group(2)]
    return f"{name[: match.start()]}.experts.{stacked}", (int(match.group(1)), part)


def expert_checkpoint_names(param_name: str, num_experts: int, projections: ExpertProjections) -> list[str] | None:
    """The checkpoint tensors a stacked expert parameter is loaded from; None if it is not one."""
    match = _STACKED_PARAM.search(param_name)
    if match is None:
        return None
    prefix = param_name[: match.start()]
    parts = [proj for proj, (stacked, _) in projections.items() if stacked == match.group(1)]
    return [f"{prefix}.experts.{expert}.{proj}.weight" for expert in range(num_experts) for proj in parts]


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 weights [T, top_k], expert ids [T, top_k]): softmax in float32, top_k, optionally renormalised."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedExperts(nn.Module):
    """All experts of one layer: this rank's slice of every expert's gated MLP."""

    def __init__(self, moe: MoeConfig, hidden_size: int, tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.num_experts, self.hidden_size = moe.num_experts, hidden_size
        self.intermediate_size = divide(moe.intermediate_size, self.tp_size)  # this rank's share
        size = self.intermediate_size
        self.w13_weight = nn.Parameter(torch.empty(moe.num_experts, 2 * size, hidden_size), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(moe.num_experts, hidden_size, size), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """One checkpoint tensor, shard_id (expert, part): gate/up [I, H] rows or down [H, I] columns."""
        assert isinstance(shard_id, tuple), "expert tensors are loaded with an (expert, part) shard id"
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside 0..{self.num_experts - 1}")
        size, start = self.intermediate_size, self.tp_rank * self.intermediate_size
        if part == 2:
            check_shape(loaded, (self.hidden_size, size * self.tp_size))
            param.data[expert].copy_(loaded.narrow(1, start, size))
        else:
            check_shape(loaded, (size * self.tp_size, self.hidden_size))
            param.data[expert].narrow(0, part * size, size).copy_(loaded.narrow(0, start, size))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        backend = kernels if x.is_cuda else moe_reference  # the fused Triton kernel on CUDA
        y = backend.fused_moe(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids)
        return all_reduce(y) if self.tp_size > 1 else y


class Router(nn.Module):
    """hidden -> one logit per expert; replicated on every rank."""

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SparseMoeBlock(nn.Module):
    """Router + experts; named `gate` and `experts` as in Mixtral and Qwen3-MoE checkpoints."""

    def __init__(self, moe: MoeConfig, hidden_size: int):
        super().__init__()
        self.top_k, self.renormalize = moe.top_k, moe.norm_topk_prob
        self.gate = Router(hidden_size, moe.num_experts)
        self.experts = FusedExperts(moe, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        return self.experts(x, weights, ids)
