"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks.

Each rank holds ceil(vocab / tp_size) rows; the last rank's tail past the real
vocabulary is zero padding, and gathered logits are cut back to vocab_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.tensor_parallel import all_gather_last_dim, all_reduce, tp_rank_and_size
from engine.layers.weights import check_shape
from kernels import cpu_linear


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(num_embeddings, self.vocab_start + self.rows_per_rank)
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        check_shape(loaded, (self.num_embeddings, param.shape[1]))
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded[self.vocab_start : self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(mine, input_ids - self.vocab_start, 0)
        y = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> logits over the whole vocabulary (gathered from all ranks)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = cpu_linear.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        return all_gather_last_dim(logits, self.tp_size)[..., : self.num_embeddings]
