"""Turns the last-position logits of a batch into next tokens, on the logits' device.

Order, per row: logprobs of the raw logits (what vLLM reports by default);
repetition penalty (HF: over prompt and output), presence and frequency
penalties (OpenAI: over the output); EOS and stop ids masked until min_tokens;
greedy rows take the argmax; the others are divided by their temperature,
filtered by top-k, top-p and min-p, and sampled with the exponential-race
trick (argmax of p / Exp(1) noise). A seeded sequence draws its noise from its
own generator, so its tokens do not depend on the batch around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprobs
from engine.sequence import Sequence


@dataclass
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None  # the chosen token first, then the top-k; None if not asked


class Sampler:
    def __init__(self, eos_token_ids: Iterable[int], seed: int, device: torch.device):
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device).manual_seed(seed)  # for unseeded requests

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        logits = logits.float()
        wants_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        logits = self._apply_penalties(logits, seqs)
        self._mask_stop_tokens_before_min_tokens(logits, seqs)
        token_ids = logits.argmax(dim=-1)
        if not all(seq.params.greedy for seq in seqs):
            greedy = torch.tensor([seq.params.greedy for seq in seqs], device=self.device)
            token_ids = torch.where(greedy, token_ids, self._sample(logits, seqs))
        chosen = token_ids.tolist()
        if raw_logprobs is None:
            return [SampledToken(token_id, None) for token_id in chosen]
        return self._with_logprobs(chosen, raw_logprobs, token_ids, seqs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, seq in enumerate(seqs) if _has_penalties(seq)]
        if not rows:
            return logits
        penalized = [seqs[i] for i in rows]
        vocab_size = logits.shape[1]
        output_counts = self._token_counts([seq.output_token_ids for seq in penalized], vocab_size)
        prompt_counts = self._token_counts([seq.token_ids[: seq.num_prompt_tokens] for seq in penalized], vocab_size)
        subset = logits[rows]
        repetition = self._column([seq.params.repetition_penalty for seq in penalized])
        seen = (output_counts + prompt_counts) > 0
        subset = torch.where(seen, torch.where(subset > 0, subset / repetition, subset * repetition), subset)
        frequency = self._column([seq.params.frequency_penalty for seq in penalized])
        presence = self._column([seq.params.presence_penalty for seq in penalized])
        subset = subset - frequency * output_counts - presence * (output_counts > 0).float()
        logits = logits.clone()
        logits[rows] = subset
        return logits

    def _mask_stop_tokens_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        for row, seq in enumerate(seqs):
            if seq.num_output_tokens < seq.params.min_tokens:
                eos = [] if seq.params.ignore_eos else self.eos_token_ids
                stop_ids = [t for t in (*eos, *seq.params.stop_token_ids) if t < logits.shape[1]]
                logits[row, stop_ids] = float("-inf")

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        temperature = self._column([seq.params.temperature if not seq.params.greedy else 1.0 for seq in seqs])
        logits = logits / temperature
        logits = self._top_k_top_p(logits, seqs)
        probs = torch.softmax(logits, dim=-1)
        min_p = self._column([seq.params.min_p for seq in seqs])
        if bool((min_p > 0).any()):
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        return (probs / self._exponential_noise(probs, seqs)).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        if all(seq.params.top_k == -1 and seq.params.top_p == 1.0 for seq in seqs):
            return logits
        vocab_size = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        top_k = self._column([seq.params.top_k if seq.params.top_k > 0 else vocab_size for seq in seqs])
        rank = torch.arange(vocab_size, device=self.device)
        sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the top token always survives
        top_p = self._column([seq.params.top_p for seq in seqs])
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)

    def _exponential_noise(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                if seq.generator is None:
                    # Each of the n completions gets its own stream (vLLM: seed + index).
                    seq.generator = torch.Generator(self.device).manual_seed(seq.params.seed + seq.index)
                noise[row].exponential_(generator=seq.generator)
        return noise

    def _with_logprobs(
        self, chosen: list[int], raw_logprobs: torch.Tensor, token_ids: torch.Tensor, seqs: list[Sequence]
    ) -> list[SampledToken]:
        top_n = max(seq.params.logprobs or 0 for seq in seqs)
        chosen_logprobs = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
        top_values, top_ids = raw_logprobs.topk(top_n, dim=-1) if top_n else (raw_logprobs[:, :0],) * 2
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        sampled = []
        for row, seq in enumerate(seqs):
            wanted = seq.params.logprobs
            if wanted is None:
                sampled.append(SampledToken(chosen[row], None))
                continue
            entry = {chosen[row]: chosen_logprobs[row]}
            for token_id, value in zip(top_ids[row][:wanted], top_values[row][:wanted]):
                entry.setdefault(token_id, value)
            sampled.append(SampledToken(chosen[row], entry))
        return sampled

    def _token_counts(self, token_lists: list[list[int]], vocab_size: int) -> torch.Tensor:
        """[rows, vocab] occurrence counts; padding goes to an extra column that is dropped."""
        width = max(1, max(len(tokens) for tokens in token_lists))
        padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        counts = torch.zeros(len(token_lists), vocab_size + 1, device=self.device)
        counts.scatter_add_(1, padded.to(self.device), torch.ones_like(counts[:, :width]))
        return counts[:, :vocab_size]

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]


def _has_penalties(seq: Sequence) -> bool:
    params = seq.params
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
