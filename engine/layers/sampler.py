"""Turns the last-position logits of a batch into next tokens, on the logits' device.

The sampler sees tensors, one row per sampling sequence (SamplingBatch, built
by the runner from the persistent input batch), never Sequence objects, and
it never waits for the GPU: its results stay on the device until the runner
copies them back.

Order, per row: logprobs of the raw logits (what vLLM reports by default);
repetition penalty (HF: over prompt and output), presence and frequency
penalties (OpenAI: over the output) from token counts kept on the device;
logit_bias added and allowed_token_ids enforced; bad_words banned; EOS and stop ids masked until
min_tokens; tokens a structured output's grammar
does not allow masked; greedy rows take the argmax; the others
are divided by their temperature, filtered by top-k, top-p and min-p, and
sampled with the exponential-race trick (argmax of p / Exp(1) noise). A seeded
sequence draws its noise from its own generator, so its tokens do not depend
on the batch around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
# Sampling parameters per row, in one float32 array so that a step copies them in one go. "greedy" is
# 1.0 for rows that take the argmax; "per_row" is 1.0 for rows that need more than these columns
# (seeds, logprobs, min_tokens, logit_bias, ...), so a step looks at those rows' Sequences only.
SAMPLING_COLUMNS = ("temperature", "top_p", "top_k", "min_p", "repetition", "frequency", "presence", "greedy", "per_row")
_COLUMN = {name: i for i, name in enumerate(SAMPLING_COLUMNS)}


@dataclass
class SamplingBatch:
    """What the sampler needs about its rows; the flags are decided on the host, for free."""

    params: torch.Tensor  # [S, len(SAMPLING_COLUMNS)] float32, on the device
    all_greedy: bool  # every row takes the argmax: nothing is drawn
    any_top_k_top_p: bool
    any_min_p: bool
    penalty_rows: torch.Tensor | None  # [P] sample rows with penalties ...
    penalty_slots: torch.Tensor | None  # [P] ... and their rows in the PenaltyState
    seeded: list[tuple[int, torch.Generator]] = field(default_factory=list)  # (sample row, generator)
    banned: list[tuple[int, list[int]]] = field(default_factory=list)  # (sample row, stop ids) before min_tokens
    logprobs_wanted: dict[int, int] = field(default_factory=dict)  # row -> top logprobs it asked for
    allowed: torch.Tensor | None = None  # [S, ceil(vocab / 32)] int32 token bitmask of structured outputs
    token_bias: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (row, ids, biases)
    only_tokens: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (row, the only ids it may sample)
    bad_words: BadWordBans | None = None

    def column(self, name: str) -> torch.Tensor:
        return self.params[:, _COLUMN[name], None]

    @property
    def num_logprobs(self) -> int | None:
        """The most top logprobs any row asked for; None: no row asked."""
        return max(self.logprobs_wanted.values()) if self.logprobs_wanted else None


@dataclass
class BadWordBans:
    """Candidate bans, one per (row, bad word) whose word fits in the row's output so far: the word's last
    token is banned when the output ends with the word's other tokens.

    Words are right-aligned in `prefixes` (-1 pads: anything matches); `history` holds each row's output
    tokens before its newest one (right-aligned), which may still be on the device (overlap scheduling),
    so the sampler reads it from `last_tokens`.
    """

    rows: torch.Tensor  # [K] sample rows
    token_ids: torch.Tensor  # [K] the token banned on a match
    prefixes: torch.Tensor  # [K, W] the word's tokens before it
    history: torch.Tensor  # [K, W - 1] the output tokens before the newest (when W > 0)
    last_tokens: torch.Tensor | None  # [S] each row's newest token (on the device); None when W is 0

    def mask(self, logits: torch.Tensor) -> None:
        """Sets the logits of the matched bans to -inf (a ban listed twice counts once)."""
        if self.prefixes.shape[1]:
            newest = self.last_tokens[self.rows, None]
            matched = ((self.prefixes == -1) | (self.prefixes == torch.cat([self.history, newest], dim=1))).all(dim=1)
        else:
            matched = torch.ones_like(self.rows, dtype=torch.bool)
        penalty = torch.where(matched, float("-inf"), 0.0)
        logits.index_put_((self.rows, self.token_ids), penalty, accumulate=True)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprob_token_ids: torch.Tensor | None  # [S, 1 + num_logprobs]: the chosen token, then the top ones
    logprobs: torch.Tensor | None  # [S, 1 + num_logprobs] float32


class PenaltyState:
    """Token counts per persistent row, on the device: the prompt's presence and the output's counts."""

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.prompt_mask = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
        self.device = device

    def reset_row(self, row: int, prompt_ids: list[int], output_ids: list[int]) -> None:
        self.prompt_mask[row].zero_()
        self.output_counts[row].zero_()
        if prompt_ids:
            self.prompt_mask[row, _device_ids(prompt_ids, self.device)] = True
        if output_ids:
            ids = _device_ids(output_ids, self.device)
            self.output_counts[row].index_add_(0, ids, torch.ones(len(output_ids), device=self.device))

    def count(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add this step's sampled tokens to their rows' output counts."""
        self.output_counts.index_put_((slots, token_ids), torch.ones_like(token_ids, dtype=torch.float32), accumulate=True)


def _device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64).to(device)


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)  # for unseeded requests

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch, penalties: PenaltyState | None) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.num_logprobs is not None else None
        if batch.penalty_rows is not None and penalties is not None:
            logits = self._apply_penalties(logits, batch, penalties)
        for row, ids, biases in batch.token_bias:
            logits[row, ids] += biases
        for row, ids in batch.only_tokens:
            kept = logits[row, ids]
            logits[row] = float("-inf")
            logits[row, ids] = kept
        if batch.bad_words is not None:
            batch.bad_words.mask(logits)
        for row, stop_ids in batch.banned:
            logits[row, stop_ids] = float("-inf")
        if batch.allowed is not None:
            from engine.structured_output import apply_bitmask  # xgrammar, loaded by the first grammar

            apply_bitmask(logits, batch.allowed)
        token_ids = logits.argmax(dim=-1)
        if not batch.all_greedy:
            token_ids = torch.where(batch.column("greedy")[:, 0] > 0, token_ids, self._sample(logits, batch))
        if batch.penalty_rows is not None and penalties is not None:
            penalties.count(batch.penalty_slots, token_ids[batch.penalty_rows])
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None)
        chosen = raw_logprobs.gather(1, token_ids[:, None])
        top_values, top_ids = raw_logprobs.topk(batch.num_logprobs, dim=-1)
        return SamplerOutput(
            token_ids, torch.cat([token_ids[:, None], top_ids], dim=1), torch.cat([chosen, top_values], dim=1)
        )

    def _apply_penalties(self, logits: torch.Tensor, batch: SamplingBatch, penalties: PenaltyState) -> torch.Tensor:
        rows, slots = batch.penalty_rows, batch.penalty_slots
        output_counts = penalties.output_counts[slots]
        seen = penalties.prompt_mask[slots] | (output_counts > 0)
        params = batch.params[rows]
        repetition = params[:, _COLUMN["repetition"], None]
        frequency = params[:, _COLUMN["frequency"], None]
        presence = params[:, _COLUMN["presence"], None]
        subset = logits[rows]
        subset = torch.where(seen, torch.where(subset > 0, subset / repetition, subset * repetition), subset)
        subset = subset - frequency * output_counts - presence * (output_counts > 0).float()
        logits = logits.clone()
        logits[rows] = subset
        return logits

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.column("temperature")
        if batch.any_top_k_top_p:
            logits = self._top_k_top_p(logits, batch)
        probs = torch.softmax(logits, dim=-1)
        if batch.any_min_p:
            min_p = batch.column("min_p")
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        return (probs / self._exponential_noise(probs, batch)).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        vocab_size = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        top_k = batch.column("top_k")
        top_k = torch.where(top_k > 0, top_k, vocab_size)
        rank = torch.arange(vocab_size, device=logits.device)
        sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the top token always survives
        sorted_logits = sorted_logits.masked_fill(mass_before >= batch.column("top_p"), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)

    def _exponential_noise(self, probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, generator in batch.seeded:
            noise[row].exponential_(generator=generator)
        return noise
