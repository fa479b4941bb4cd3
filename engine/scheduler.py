"""Iteration-level scheduling: which sequences compute how many tokens this step.

Every step has one token budget (max_num_batched_tokens) and a cap on the
number of running sequences (max_num_seqs). Running sequences go first, oldest
first: a decode takes one token, a partly computed prompt takes the next chunk
that fits. Then waiting sequences are admitted in arrival order, their prompt
chunked to the budget left, reusing cached prefix blocks.

When a running sequence cannot get a KV block, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the waiting
queue, keeping its generated tokens, to be recomputed later (with prefix
caching, mostly from cache).

A step is schedule() -> the model runs -> update(). schedule() counts the
scheduled tokens as computed at once and each sampling sequence as one
(placeholder) token longer, so the next step can be scheduled while this one
is still on the GPU; update() writes in the sampled tokens, registers full
blocks in the prefix cache, applies the stop rules and frees what finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import time

import numpy as np

from engine.block_manager import FREED_BLOCK, BlockManager
from engine.core_messages import PromptLogprobs, RequestScheduled, SequenceDelta, TokenLogprobs
from engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """This step's work: seqs[i] computes tokens [starts[i], starts[i] + num_new_tokens[i]).

    samples[i]: those tokens reach the end of the sequence, so its last logits
    give a new token (false for a prompt chunk that leaves more for later).
    """

    seqs: list[Sequence] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    newly_scheduled: list[RequestScheduled] = field(default_factory=list)
    released: list[int] = field(default_factory=list)  # seq ids that left the running set since the last batch
    computing_prompt: set[int] = field(default_factory=set)  # seq ids with prompt tokens in this step
    # (index in seqs, first, end): the prompt positions [first, end) whose logits give prompt logprobs.
    prompt_logprob_spans: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        """Schedule seq's next tokens: they count as computed, and a sampled token as a placeholder."""
        num_computed = seq.num_computed_tokens
        samples = num_new_tokens == seq.num_uncomputed_tokens
        self.seqs.append(seq)
        self.starts.append(num_computed)
        self.num_new_tokens.append(num_new_tokens)
        self.samples.append(samples)
        if num_computed < seq.num_prompt_tokens:
            self.computing_prompt.add(seq.seq_id)
        request = seq.request
        if request.prompt_logprobs is not None and seq is request.leader and request.needs_prompt_logprobs:
            first = max(num_computed, request.prompt_logprob_positions)
            end = min(num_computed + num_new_tokens, seq.num_prompt_tokens - 1)
            if end > first:
                self.prompt_logprob_spans.append((len(self.seqs) - 1, first, end))
                request.prompt_logprob_positions = end
        seq.num_computed_tokens += num_new_tokens
        seq.num_placeholders += samples

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [seq for seq, samples in zip(self.seqs, self.samples) if samples]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SampledTokens:
    """The tokens a step sampled, one per sampling sequence of its batch, in batch order."""

    token_ids: np.ndarray  # [num_sampling] int64
    logprobs: list[TokenLogprobs | None] | None = None  # None: no sequence asked for logprobs
    prompt_logprobs: dict[int, PromptLogprobs] = field(default_factory=dict)  # index in the batch's seqs -> logprobs


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_chunked_prefills: int = 0  # prompt chunks that left part of the prompt for a later step
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found computed


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        kv_window: int | None = None,
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.kv_window = kv_window  # every layer attends this far back: older blocks are freed
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.counters = SchedulerCounters()
        self.generation_tokens_total = 0
        self._released: list[int] = []

    def add_request(self, request: Request) -> None:
        self.waiting.extend(request.seqs)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        preemptions_before = self.counters.num_preemptions
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if self.counters.num_preemptions == preemptions_before:  # blocks are short: admit nobody
            self._admit_waiting(batch, budget)
        if batch.seqs:  # rows of sequences that left are freed by the next step that runs
            batch.released, self._released = self._released, []
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget:
            seq = self.running[i]
            if seq.num_placeholders and reaches_length_limit(seq, seq.num_tokens, self.max_model_len):
                i += 1  # its token on the GPU is its last: nothing more to compute
                continue
            num_new = self._chunk(seq, seq.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(seq, num_new):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    return budget
            batch.add(seq, num_new)
            budget -= num_new
            i += 1
        return budget

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_placeholders:
                break  # preempted with a token still on the GPU: it is known after this step's update
            leader = seq.request.leader
            leader_prefilling = leader.is_prefilling or leader.seq_id in batch.computing_prompt
            if seq is not leader and leader.status is SequenceStatus.RUNNING and leader_prefilling:
                break  # wait one step or a few so it can share the leader's prompt blocks
            shared = self._reusable_prefix(seq, leader_prefilling)
            num_cached = len(shared) * self.block_manager.block_size
            num_new = self._chunk(seq, seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_new, shared):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            request = seq.request
            if not request.scheduled:
                request.scheduled = True
                request.num_cached_tokens = num_cached
                batch.newly_scheduled.append(RequestScheduled(request.request_id, time.monotonic(), num_cached))
            self.counters.prefix_cache_queries += seq.num_tokens
            self.counters.prefix_cache_hits += num_cached
            batch.add(seq, num_new)
            budget -= num_new

    def _reusable_prefix(self, seq: Sequence, leader_prefilling: bool) -> list[int]:
        """Computed blocks seq can start from: prefix-cache hits, else its leader's prompt blocks
        (once a step before this one computed them)."""
        cached = [] if seq.request.needs_prompt_logprobs else self.block_manager.find_cached_prefix(seq)
        leader = seq.request.leader
        if cached or seq is leader or leader.status is not SequenceStatus.RUNNING or leader_prefilling:
            return cached
        shared = leader.block_table[: (seq.num_prompt_tokens - 1) // self.block_manager.block_size]
        return [] if FREED_BLOCK in shared else shared  # the window dropped part of it: recompute

    def _chunk(self, seq: Sequence, num_uncomputed: int, budget: int) -> int:
        if num_uncomputed > budget:
            self.counters.num_chunked_prefills += 1
            return budget
        return num_uncomputed

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first in line for recompute."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._released.append(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.counters.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: SampledTokens) -> list[SequenceDelta]:
        """After a step: write in the sampled tokens, cache full blocks, stop what ended.

        A sequence that finished (or was aborted) after this step was scheduled
        drops its token: that step ran one token too far, speculatively.
        """
        deltas = []
        token_ids = sampled.token_ids.tolist()
        all_logprobs = sampled.logprobs
        row = 0
        for i, (seq, samples) in enumerate(zip(batch.seqs, batch.samples)):
            if sampled.prompt_logprobs and (prompt_logprobs := sampled.prompt_logprobs.get(i)) is not None:
                if not seq.is_finished:
                    seq.request.prompt_logprobs.extend(prompt_logprobs)
            if not samples:
                if not seq.is_finished:
                    self._computed(seq)
                continue
            token = token_ids[row]
            logprobs = all_logprobs[row] if all_logprobs is not None else None
            row += 1
            if seq.is_finished:
                continue
            seq.num_placeholders -= 1
            seq.token_ids.append(token)
            self._computed(seq)
            if seq.grammar is not None:
                seq.grammar.accept(token)
            if check_stop(seq, token, self.eos_token_ids, self.max_model_len):
                self.finish(seq)
            delta = SequenceDelta(seq.request.request_id, seq.index, [token], None, seq.finish_reason, seq.stop_reason)
            if logprobs is not None:
                delta.new_logprobs = [logprobs]
            request = seq.request
            if request.prompt_logprobs is not None and seq is request.leader:
                if len(seq.token_ids) == seq.num_prompt_tokens + 1:  # its first token (a placeholder may follow)
                    delta.prompt_logprobs = request.prompt_logprobs
            deltas.append(delta)
        self.generation_tokens_total += len(deltas)
        return deltas

    def _computed(self, seq: Sequence) -> None:
        """Blocks the step filled join the prefix cache; with a sliding window, blocks behind it go.

        The step already in flight may still read a block released here: freed blocks are
        only rewritten by steps launched later, which the GPU runs after it.
        """
        self.block_manager.cache_computed_blocks(seq)
        if self.kv_window is not None:
            self.block_manager.free_blocks_outside_window(seq, self.kv_window)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence that just finished (or was aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._released.append(seq.seq_id)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)


def check_stop(seq: Sequence, token: int, eos_token_ids: frozenset[int], max_model_len: int) -> bool:
    """vLLM's token-level stop rules for seq's newest token; finishes seq and says so when one applies.

    Stop strings need text, so the front end checks those (and aborts the request).
    """
    params = seq.params
    if seq.grammar is not None and seq.grammar.is_terminated:  # it accepted a stop token: the output is whole
        seq.finish("stop", None if token in eos_token_ids else token)
        return True
    num_tokens = len(seq.token_ids)  # the known ones: the next step's placeholder may be counted already
    num_output_tokens = num_tokens - seq.num_prompt_tokens
    if num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token in eos_token_ids:
            seq.finish("stop")
            return True
        if token in params.stop_token_ids:
            seq.finish("stop", token)
            return True
    if reaches_length_limit(seq, num_tokens, max_model_len):
        seq.finish("length")
        return True
    return False


def reaches_length_limit(seq: Sequence, num_tokens: int, max_model_len: int) -> bool:
    """Whether num_tokens of seq (the known ones, or with its token still on the GPU) use up
    its max_tokens or the context."""
    return num_tokens - seq.num_prompt_tokens >= seq.request.max_tokens or num_tokens >= max_model_len
