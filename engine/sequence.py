"""Per-request state: a Request holds n Sequences, one per completion.

A sequence is a growing list of token ids (prompt, then generated) of which
the first `num_computed_tokens` have their K/V in the paged cache. Prefill,
chunked prefill, decode and recompute after preemption are all the same
operation: compute the next uncomputed tokens; when none remain, the logits
of the last one give the next token.
"""

from __future__ import annotations

import enum
import itertools

import torch

from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprobs
from engine.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    def __init__(self, request: Request, index: int):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index  # which of the request's n completions
        self.params = request.params
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING

        # KV-cache state, owned by the BlockManager.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hashes of full token blocks, filled lazily
        self.num_cached_blocks = 0  # leading blocks of block_table registered in the prefix cache

        # Sampling state: a seeded request draws from its own generator so its tokens do
        # not depend on the batch around it (created on the logits' device by the sampler).
        self.generator: torch.Generator | None = None

        # Output state, owned by the engine's output processing and the Detokenizer.
        self.output_text = ""
        self.prefix_offset = max(self.num_prompt_tokens - 5, 0)  # detokenizer window
        self.read_offset = self.num_prompt_tokens
        self.logprobs: list[TokenLogprobs] | None = [] if self.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """Still computing its prompt (the first token of a sibling may reuse it)."""
        return self.num_computed_tokens < self.num_prompt_tokens

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.cumulative_logprob += logprobs[token_id]
            if self.logprobs is not None:
                self.logprobs.append(logprobs)

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    @property
    def visible_text(self) -> str:
        """The text so far, minus a tail that could still become a stop string.

        Holding back len(longest stop) - 1 characters while running means streamed
        text never has to be taken back when a stop string completes.
        """
        if self.is_finished or not self.params.stop:
            return self.output_text
        hold_back = max(len(s) for s in self.params.stop) - 1
        return self.output_text[: max(len(self.output_text) - hold_back, 0)]

    def completion_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.visible_text,
            token_ids=self.output_token_ids,
            cumulative_logprob=self.cumulative_logprob if self.logprobs is not None else None,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


class Request:
    """One add_request call: the prompt, its parameters, and its n sequences."""

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        max_tokens: int,
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.max_tokens = max_tokens  # params.max_tokens, or what the context leaves when that is None
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.num_cached_tokens = 0
        self.seqs = [Sequence(self, i) for i in range(params.n)]

    @property
    def leader(self) -> Sequence:
        """The sequence whose computed prompt blocks the others share."""
        return self.seqs[0]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[seq.completion_output() for seq in self.seqs],
            finished=self.is_finished,
            metrics=self.metrics,
            num_cached_tokens=self.num_cached_tokens,
        )
