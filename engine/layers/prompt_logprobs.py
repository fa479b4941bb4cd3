"""Prompt logprobs: the log-softmax at each prompt position, read at the prompt token that follows it.

The logits of every position of a long prompt do not fit in memory at once
(positions x vocabulary floats), so they are computed and reduced in chunks of
PROMPT_LOGITS_CHUNK positions; what is kept per position is the prompt token's
logprob and rank and the top-k. Every tensor-parallel rank runs the same
chunks, because computing logits gathers the vocabulary shards of all ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PROMPT_LOGITS_CHUNK = 512


@dataclass
class PromptLogprobTensors:
    token_ids: torch.Tensor  # [N, 1 + k] int64: the prompt token, then the top k
    logprobs: torch.Tensor  # [N, 1 + k] float32
    ranks: torch.Tensor  # [N] int64: the prompt token's rank (1: the most likely)


def compute_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor, num_top: int
) -> PromptLogprobTensors:
    """hidden: [N, hidden_size] at prompt positions; targets: [N] the prompt token after each position.

    A rank counts the tokens at least as likely as the prompt token, as vLLM does.
    """
    parts = []
    for start in range(0, len(hidden), PROMPT_LOGITS_CHUNK):
        logprobs = torch.log_softmax(compute_logits(hidden[start : start + PROMPT_LOGITS_CHUNK]), dim=-1)
        target = targets[start : start + PROMPT_LOGITS_CHUNK, None]
        chosen = logprobs.gather(1, target)
        ranks = (logprobs >= chosen).sum(dim=-1)
        top_values, top_ids = logprobs.topk(num_top, dim=-1)
        parts.append((torch.cat([target, top_ids], dim=1), torch.cat([chosen, top_values], dim=1), ranks))
    token_ids, logprobs, ranks = (torch.cat(tensors) for tensors in zip(*parts))
    return PromptLogprobTensors(token_ids, logprobs, ranks)
