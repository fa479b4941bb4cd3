"""The per-step description of a flattened batch, shared by the runner and the model.

Each step packs the new tokens of B sequences back to back (T tokens in all):
prefill chunks and single decode tokens mixed. The ModelRunner builds this;
every attention layer reads it to write K/V into the paged cache and attend
through block tables. Nothing here is padded to max_model_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding, not stored)
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts per sequence
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids, padded with 0
    max_query_len: int  # 1 means a decode-only step
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1
