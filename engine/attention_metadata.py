"""The per-step description of a flattened batch, shared by the runner and the model.

Each step packs the new tokens of B sequences back to back (T tokens in all):
prefill chunks and single decode tokens mixed. The ModelRunner builds this;
every attention layer reads it to write K/V into the paged cache and attend
through block tables. Nothing here is padded to max_model_len.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.cpu_attention import DecodeContext, StoreSlots


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding, not stored)
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts per sequence
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new tokens)
    block_tables: torch.Tensor  # [B, max_blocks] int32: physical block ids, padded with 0
    max_query_len: int  # 1 means a decode-only step
    max_seq_len: int
    # What the CPU attention derives from the above, built by the first layer that asks, reused by the rest.
    _cpu_store_slots: StoreSlots | None = field(default=None, repr=False, compare=False)
    _cpu_decode_context: DecodeContext | None = field(default=None, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1

    def cpu_store_slots(self) -> StoreSlots:
        if self._cpu_store_slots is None:
            self._cpu_store_slots = StoreSlots(self.slot_mapping)
        return self._cpu_store_slots

    def cpu_decode_context(self, block_size: int) -> DecodeContext:
        if self._cpu_decode_context is None:
            self._cpu_decode_context = DecodeContext(self.block_tables, self.seq_lens, block_size)
        return self._cpu_decode_context
