"""Per-request state in the engine core: a Request holds n Sequences, one per completion.

A sequence is a growing list of token ids (prompt, then generated) of which
the first `num_computed_tokens` have their K/V in the paged cache (or will
have, once the step in flight ends). Prefill, chunked prefill, decode and
recompute after preemption are all the same operation: compute the next
uncomputed tokens; when none remain, the logits of the last one give the next
token.

With overlapped scheduling, a token sampled by the step still on the GPU is
not known on the host yet: it counts as a placeholder (`num_placeholders`)
until Scheduler.update writes it in. The next step's input reads it on the
device.
"""

from __future__ import annotations

import enum
import itertools
from typing import TYPE_CHECKING

import torch

from engine.core_messages import EngineCoreRequest, PromptLogprobs
from engine.sampling import SamplingParams

if TYPE_CHECKING:  # xgrammar is imported only once a request asks for a structured output
    from engine.structured_output import RequestGrammar


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
        self.num_placeholders = 0  # sampled on the device, not yet read back (0 or 1)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | None = None

        # KV-cache state, owned by the BlockManager.
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chain hashes of full token blocks, filled lazily
        self.num_cached_blocks = 0  # leading blocks of block_table registered in the prefix cache

        # A seeded sequence draws from its own generator (made by the runner on its device), so its
        # tokens do not depend on the batch around it; it lives here to survive preemption.
        self.generator: torch.Generator | None = None
        # With a structured output: where the sequence is in its grammar (set by the engine core).
        self.grammar: RequestGrammar | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens the sequence has, the ones still on the device included."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefilling(self) -> bool:
        """Still computing its prompt (the first token of a sibling may reuse it)."""
        return self.num_computed_tokens < self.num_prompt_tokens

    def finish(self, reason: str, stop_reason: int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request.request_id}#{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


class Request:
    """One request in the core: its parameters and its n sequences."""

    def __init__(self, core_request: EngineCoreRequest):
        self.request_id = core_request.request_id
        self.prompt_token_ids = core_request.prompt_token_ids
        self.params: SamplingParams = core_request.params
        self.arrival_time = core_request.arrival_time
        self.max_tokens = core_request.max_tokens  # params.max_tokens, or what the context leaves
        self.scheduled = False  # reported once, when its first step is scheduled
        self.num_cached_tokens = 0
        self.seqs = [Sequence(self, i) for i in range(self.params.n)]
        # With prompt_logprobs: the leader's prompt positions whose logits are scheduled so far (the logits at
        # position p give prompt token p + 1), and the logprobs read back so far.
        self.prompt_logprob_positions = 0
        self.prompt_logprobs = PromptLogprobs() if self.params.prompt_logprobs is not None else None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and some positions are not scheduled yet: a cached block has no
        logits, so such a request does not start from the prefix cache (as in vLLM)."""
        return self.prompt_logprobs is not None and self.prompt_logprob_positions < len(self.prompt_token_ids) - 1

    @property
    def leader(self) -> Sequence:
        """The sequence whose computed prompt blocks the others share."""
        return self.seqs[0]

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
