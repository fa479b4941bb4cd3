"""From the core's sequences to the sampler's tensors (engine.layers.sampler.SamplingBatch).

The per-row numbers (temperature, top-p, ...) are written once, when a
sequence takes its row in the persistent batch (`sampling_row`); each step
only gathers the sampling rows and decides on the host which of the
sampler's optional passes the batch needs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engine.layers.sampler import SAMPLING_COLUMNS, BadWordBans, PenaltyState, SamplingBatch
from engine.sampling import SamplingParams, num_top_logprobs
from engine.sequence import Sequence


def sampling_row(params: SamplingParams) -> tuple[float, ...]:
    """One row of engine.layers.sampler.SAMPLING_COLUMNS; top_k 0 means no top-k filter."""
    return (
        1.0 if params.greedy else params.temperature,
        params.top_p,
        params.top_k if params.top_k > 0 else 0,
        params.min_p,
        params.repetition_penalty,
        params.frequency_penalty,
        params.presence_penalty,
        float(params.greedy),
        float(needs_per_row_work(params)),
    )


def needs_per_row_work(params: SamplingParams) -> bool:
    """Whether sampling this row needs its Sequence each step, beyond its SAMPLING_COLUMNS."""
    return bool(
        (params.seed is not None and not params.greedy)
        or params.min_tokens > 0
        or params.logprobs is not None
        or params.logit_bias
        or params.allowed_token_ids
        or params.bad_words_token_ids
        or params.structured_output is not None
    )


def has_penalties(repetition: float | np.ndarray, frequency: float | np.ndarray,
                  presence: float | np.ndarray) -> bool | np.ndarray:
    """Whether a row applies any penalty; for one row's floats or, elementwise, for columns of rows."""
    return (repetition != 1.0) | (frequency != 0.0) | (presence != 0.0)


def banned_before_min_tokens(params: SamplingParams, eos_token_ids: tuple[int, ...], vocab_size: int) -> list[int]:
    """The token ids a sequence may not sample before min_tokens."""
    eos = () if params.ignore_eos else eos_token_ids
    return [t for t in (*eos, *params.stop_token_ids) if t < vocab_size]


def device_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small tensor on the device, copied from page-locked memory so that the copy does not wait."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def bad_word_bans(seqs: list[Sequence], rows_with_bad_words: list[int], newest_tokens: Callable[[], torch.Tensor],
                  device: torch.device) -> BadWordBans | None:
    """The bans of the rows' bad words that fit in their output so far (vLLM matches output tokens only)."""
    candidates = []
    for row in rows_with_bad_words:
        seq = seqs[row]
        num_past = seq.num_output_tokens - 1  # the token being sampled is counted already
        candidates += [(row, num_past, word) for word in seq.params.bad_words_token_ids if len(word) - 1 <= num_past]
    if not candidates:
        return None
    width = max(len(word) - 1 for _, _, word in candidates)
    prefixes, history = [], []
    for row, num_past, word in candidates:
        seq = seqs[row]
        # The output before the newest token is known on the host; the newest may be on the device.
        before = seq.token_ids[seq.num_prompt_tokens : seq.num_prompt_tokens + num_past - 1][-(width - 1):] if width > 1 else []
        history.append([-2] * (width - 1 - len(before)) + before)
        prefixes.append([-1] * (width - len(word) + 1) + word[:-1])
    return BadWordBans(
        rows=device_tensor([row for row, _, _ in candidates], torch.int64, device),
        token_ids=device_tensor([word[-1] for _, _, word in candidates], torch.int64, device),
        prefixes=device_tensor(prefixes, torch.int64, device).view(len(candidates), width),
        history=device_tensor(history, torch.int64, device).view(len(candidates), max(width - 1, 0)),
        last_tokens=newest_tokens() if width else None,
    )


class SamplingState:
    """Rank 0's sampling state that outlives a step: seeded generators and penalty token counts.

    Penalty counts live on the device in rows parallel to the persistent
    batch's, allocated when the first request with a penalty arrives.
    """

    def __init__(self, num_rows: int, vocab_size: int, eos_token_ids: tuple[int, ...], device: torch.device):
        self.num_rows = num_rows
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.penalties: PenaltyState | None = None

    def add_row(self, row: int, seq: Sequence) -> None:
        """seq took persistent row `row` (it joined, or came back after preemption)."""
        params = seq.params
        if params.seed is not None and not params.greedy and seq.generator is None:
            # Each of the n completions gets its own stream (vLLM: seed + index).
            seq.generator = torch.Generator(self.device).manual_seed(params.seed + seq.index)
        if has_penalties(params.repetition_penalty, params.frequency_penalty, params.presence_penalty):
            if self.penalties is None:
                self.penalties = PenaltyState(self.num_rows, self.vocab_size, self.device)
            self.penalties.reset_row(row, seq.token_ids[: seq.num_prompt_tokens], seq.output_token_ids)

    def batch(self, seqs: list[Sequence], params: torch.Tensor, rows: np.ndarray,
              newest_tokens: Callable[[], torch.Tensor]) -> SamplingBatch:
        """seqs sample this step, in batch order, from persistent rows `rows`; params holds their
        sampling rows (host; page-locked on CUDA); newest_tokens() gives each one's newest token, on the device.

        The flags come from params' columns; only rows marked "per_row" are looked at one by one.
        """
        device = self.device
        host = params.numpy()
        column = {name: host[:, i] for i, name in enumerate(SAMPLING_COLUMNS)}
        penalized = np.flatnonzero(has_penalties(column["repetition"], column["frequency"], column["presence"]))
        special = [(i, seqs[i]) for i in np.flatnonzero(column["per_row"]).tolist()]
        return SamplingBatch(
            params=params.to(device, non_blocking=True),
            all_greedy=bool(column["greedy"].all()),
            any_top_k_top_p=bool(((column["top_k"] > 0) | (column["top_p"] < 1.0)).any()),
            any_min_p=bool((column["min_p"] > 0).any()),
            penalty_rows=device_tensor(penalized.tolist(), torch.int64, device) if len(penalized) else None,
            penalty_slots=device_tensor(rows[penalized].tolist(), torch.int64, device) if len(penalized) else None,
            seeded=[(i, seq.generator) for i, seq in special if seq.generator is not None],
            # The token being sampled is output number num_output_tokens - 1: its placeholder is counted.
            banned=[
                (i, banned_before_min_tokens(seq.params, self.eos_token_ids, self.vocab_size))
                for i, seq in special
                if seq.num_output_tokens - 1 < seq.params.min_tokens
            ],
            logprobs_wanted={
                i: num_top_logprobs(seq.params.logprobs, self.vocab_size) for i, seq in special if seq.params.logprobs is not None
            },
            allowed=self._grammar_bitmask(seqs, special),
            token_bias=[
                (i, device_tensor(list(bias), torch.int64, device), device_tensor(list(bias.values()), torch.float32, device))
                for i, seq in special if (bias := seq.params.logit_bias)
            ],
            only_tokens=[
                (i, device_tensor(allowed, torch.int64, device))
                for i, seq in special if (allowed := seq.params.allowed_token_ids)
            ],
            bad_words=bad_word_bans(seqs, [i for i, seq in special if seq.params.bad_words_token_ids], newest_tokens, device),
        )

    def _grammar_bitmask(self, seqs: list[Sequence], special: list[tuple[int, Sequence]]) -> torch.Tensor | None:
        """The tokens each row's grammar allows next (every token for rows without one); None when no
        row has a grammar (only "per_row" rows, `special`, can have one).

        A grammar that allows nothing (it cannot go on) gets its stop tokens, so the
        sequence ends instead of sampling from an empty distribution.
        """
        if all(seq.grammar is None for _, seq in special):
            return None
        grammars = [seq.grammar for seq in seqs]
        from engine.structured_output import allocate_bitmask, fill_bitmask  # xgrammar, loaded by the first grammar

        bitmask = allocate_bitmask(len(seqs), self.vocab_size)
        for row in fill_bitmask(grammars, bitmask):
            bitmask[row] = 0
            for token in self.eos_token_ids:
                bitmask[row, token // 32] |= 1 << (token % 32)
        return bitmask.to(self.device)
