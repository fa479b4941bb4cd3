"""The persistent input batch: one row per running sequence, kept between steps.

Rebuilding a step's tensors from Python lists costs tens of microseconds per
sequence, every step. Instead each running sequence owns a row of
preallocated arrays (its token ids, block table and sampling parameters),
written when it joins and then only where it grew: one token and, every
block_size steps, one block id. A step's flat inputs are then a few numpy
gathers over the scheduled rows, written into page-locked staging buffers
that the GPU copies asynchronously.

The staging buffers come in two sets used alternately: while the GPU may still
be copying step n's inputs, step n+1 is written into the other set. Step n-1,
the last user of that set, has ended by then (its sampled tokens were read).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.block_manager import cdiv
from engine.layers.sampler import SAMPLING_COLUMNS
from engine.sampling_batch import sampling_row
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


@dataclass
class StepArrays:
    """A step's flat inputs as page-locked host tensors (views of a staging set)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, W] int32
    logits_indices: torch.Tensor  # [S] int64
    max_query_len: int
    max_seq_len: int
    sampling_rows: np.ndarray  # [S] the rows of the sampling sequences, in batch order
    placeholder_dst: torch.Tensor  # [P] int64: token indices whose id is still on the device ...
    placeholder_src: torch.Tensor  # [P] int64: ... and the row of the previous step's sampled ids that holds it
    prompt_logits_indices: torch.Tensor  # [N] int64: token indices whose logits give prompt logprobs ...
    prompt_logprob_targets: torch.Tensor  # [N] int64: ... of these prompt tokens (the next position's)


_NO_POSITIONS = torch.empty(0, dtype=torch.int64)  # most steps: nobody asked for prompt logprobs


def prompt_logprob_positions(batch: ScheduledBatch, first_tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat token indices of the batch's prompt-logprob spans, and the prompt token each one predicts."""
    if not batch.prompt_logprob_spans:
        return _NO_POSITIONS, _NO_POSITIONS
    indices: list[int] = []
    targets: list[int] = []
    for i, first, end in batch.prompt_logprob_spans:
        offset = int(first_tokens[i]) - batch.starts[i]
        indices.extend(range(offset + first, offset + end))
        targets.extend(batch.seqs[i].token_ids[first + 1 : end + 1])
    return torch.tensor(indices, dtype=torch.int64), torch.tensor(targets, dtype=torch.int64)


def _staged(buffer: torch.Tensor, values: list[int]) -> torch.Tensor:
    """values written into the front of a staging buffer (a view of it)."""
    view = buffer[: len(values)]
    view.numpy()[:] = values
    return view


class _StagingSet:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, pin: bool):
        def buffer(size: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(size, dtype=dtype, pin_memory=pin)

        self.input_ids = buffer(max_tokens, torch.int64)
        self.positions = buffer(max_tokens, torch.int64)
        self.slot_mapping = buffer(max_tokens, torch.int64)
        self.query_start_loc = buffer(max_seqs + 1, torch.int32)
        self.seq_lens = buffer(max_seqs, torch.int32)
        self.block_tables = buffer(max_seqs * max_blocks, torch.int32)
        self.logits_indices = buffer(max_seqs, torch.int64)
        self.placeholder_dst = buffer(max_seqs, torch.int64)
        self.placeholder_src = buffer(max_seqs, torch.int64)
        self.sampling = buffer(max_seqs * len(SAMPLING_COLUMNS), torch.float32)


class InputBatch:
    def __init__(
        self, max_num_seqs: int, max_model_len: int, max_num_batched_tokens: int, block_size: int, pin: bool
    ):
        self.max_model_len = max_model_len
        self.block_size = block_size
        max_blocks = cdiv(max_model_len, block_size)
        self.token_ids = np.zeros((max_num_seqs, max_model_len), dtype=np.int64)
        self.block_tables = np.zeros((max_num_seqs, max_blocks), dtype=np.int32)
        # Token and block ids written into each row so far, as lists: the per-sequence checks of a
        # step index them, and a Python list answers faster than a numpy array one element at a time.
        self.num_known = [0] * max_num_seqs
        self.num_blocks_written = [0] * max_num_seqs
        self.sampling = np.zeros((max_num_seqs, len(SAMPLING_COLUMNS)), dtype=np.float32)
        self.seqs: list[Sequence | None] = [None] * max_num_seqs  # the sequence of each row
        self.rows: dict[int, int] = {}  # seq_id -> row
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self._staging = [
            _StagingSet(max_num_batched_tokens, max_num_seqs, max_blocks, pin),
            _StagingSet(max_num_batched_tokens, max_num_seqs, max_blocks, pin),
        ]
        self._step = 0

    # Rows ----------------------------------------------------------------------------------

    def release(self, seq_ids: list[int]) -> list[int]:
        """Free the rows of sequences that finished or were preempted; returns the freed rows."""
        freed = []
        for seq_id in seq_ids:
            row = self.rows.pop(seq_id, None)
            if row is not None:
                self.seqs[row] = None
                self._free_rows.append(row)
                freed.append(row)
        return freed

    def _add_row(self, seq: Sequence) -> int:
        row = self._free_rows.pop()
        self.rows[seq.seq_id] = row
        self.seqs[row] = seq
        self.num_known[row] = 0
        self.num_blocks_written[row] = 0
        self.sampling[row] = sampling_row(seq.params)
        return row

    def _sync_blocks(self, row: int, table: list[int]) -> None:
        """Write the block ids seq gained since its row was last written (every block_size tokens)."""
        written = self.num_blocks_written[row]
        self.block_tables[row, written : len(table)] = table[written:]
        self.num_blocks_written[row] = len(table)

    # A step ---------------------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch, previous_sample_rows: dict[int, int]) -> tuple[StepArrays, list[int]]:
        """The step's inputs, and the rows that were new this step (their sampling state needs setting).

        previous_sample_rows: seq_id -> index in the previous step's sampled ids, for
        sequences whose newest token is still on the device.
        """
        num_seqs = len(batch.seqs)
        row_of, num_known, num_blocks_written = self.rows, self.num_known, self.num_blocks_written
        rows: list[int] = []
        new_rows = []
        # A decode step gives each sequence one known token since its last step: those are written
        # with one scatter (flat index into token_ids), longer gains (prompts, recompute) row by row.
        one_token_at, one_token = [], []
        placeholder_dst, placeholder_src = [], []
        first_token = 0
        for seq, start, num_new in zip(batch.seqs, batch.starts, batch.num_new_tokens):
            row = row_of.get(seq.seq_id)
            if row is None:
                row = self._add_row(seq)
                new_rows.append(row)
            rows.append(row)
            token_ids = seq.token_ids
            known, written = len(token_ids), num_known[row]
            if known == written + 1:
                one_token_at.append(row * self.max_model_len + written)
                one_token.append(token_ids[written])
                num_known[row] = known
            elif known > written:
                self.token_ids[row, written:known] = token_ids[written:known]
                num_known[row] = known
            if len(seq.block_table) > num_blocks_written[row]:
                self._sync_blocks(row, seq.block_table)
            if start + num_new > known:  # the last input token was sampled by the step in flight
                placeholder_dst.append(first_token + known - start)
                placeholder_src.append(previous_sample_rows[seq.seq_id])
            first_token += num_new
        if one_token_at:
            self.token_ids.reshape(-1)[one_token_at] = one_token
        width = max(map(num_blocks_written.__getitem__, rows))
        rows = np.asarray(rows, dtype=np.int64)

        staging = self._staging[self._step % 2]
        self._step += 1
        num_new = np.asarray(batch.num_new_tokens, dtype=np.int64)
        starts = np.asarray(batch.starts, dtype=np.int64)
        ends = starts + num_new
        num_tokens = first_token
        cu_tokens = np.cumsum(num_new)

        query_start_loc = staging.query_start_loc[: num_seqs + 1]
        query_start_loc.numpy()[0] = 0
        query_start_loc.numpy()[1:] = cu_tokens
        token_rows = np.repeat(rows, num_new)
        positions = staging.positions[:num_tokens]
        positions_np = positions.numpy()
        np.subtract(np.arange(num_tokens), np.repeat(cu_tokens - num_new - starts, num_new), out=positions_np)
        input_ids = staging.input_ids[:num_tokens]
        np.take(self.token_ids.reshape(-1), token_rows * self.max_model_len + positions_np, out=input_ids.numpy())
        slot_mapping = staging.slot_mapping[:num_tokens]
        block_ids = self.block_tables[token_rows, positions_np // self.block_size]
        np.add(block_ids * self.block_size, positions_np % self.block_size, out=slot_mapping.numpy())
        seq_lens = staging.seq_lens[:num_seqs]
        seq_lens.numpy()[:] = ends
        block_tables = staging.block_tables[: num_seqs * width].view(num_seqs, width)
        np.take(self.block_tables[:, :width], rows, axis=0, out=block_tables.numpy())
        samples = np.asarray(batch.samples, dtype=bool)
        num_sampling = int(samples.sum())
        logits_indices = staging.logits_indices[:num_sampling]
        logits_indices.numpy()[:] = (cu_tokens - 1)[samples]
        prompt_indices, prompt_targets = prompt_logprob_positions(batch, cu_tokens - num_new)
        arrays = StepArrays(
            input_ids=input_ids,
            positions=positions,
            slot_mapping=slot_mapping,
            query_start_loc=query_start_loc,
            seq_lens=seq_lens,
            block_tables=block_tables,
            logits_indices=logits_indices,
            max_query_len=int(num_new.max()),
            max_seq_len=int(ends.max()),
            sampling_rows=rows[samples],
            placeholder_dst=_staged(staging.placeholder_dst, placeholder_dst),
            placeholder_src=_staged(staging.placeholder_src, placeholder_src),
            prompt_logits_indices=prompt_indices,
            prompt_logprob_targets=prompt_targets,
        )
        return arrays, new_rows

    def sampling_parameters(self, sampling_rows: np.ndarray) -> torch.Tensor:
        """[S, len(SAMPLING_COLUMNS)] float32 page-locked: the sampling rows' parameters.

        Staged in the set that prepare() used last, so it lives as long as that step's inputs.
        """
        staging = self._staging[(self._step - 1) % 2]
        out = staging.sampling[: len(sampling_rows) * len(SAMPLING_COLUMNS)].view(len(sampling_rows), -1)
        np.take(self.sampling, sampling_rows, axis=0, out=out.numpy())
        return out
