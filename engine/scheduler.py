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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Request, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """This step's work: seqs[i] computes its next num_new_tokens[i] tokens.

    samples[i]: those tokens reach the end of the sequence, so its last logits
    give a new token (false for a prompt chunk that leaves more for later).
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.samples.append(num_new_tokens == seq.num_uncomputed_tokens)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [seq for seq, samples in zip(self.seqs, self.samples) if samples]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class SchedulerCounters:
    num_preemptions: int = 0
    num_chunked_prefills: int = 0  # prompt chunks that left part of the prompt for a later step
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found computed


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.counters = SchedulerCounters()

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
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget:
            seq = self.running[i]
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
            leader = seq.request.leader
            if seq is not leader and leader.status is SequenceStatus.RUNNING and leader.is_prefilling:
                break  # wait one step or a few so it can share the leader's prompt blocks
            shared = self._reusable_prefix(seq)
            num_cached = len(shared) * self.block_manager.block_size
            num_new = self._chunk(seq, seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_new, shared):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.num_output_tokens == 0 and seq is leader:
                seq.request.num_cached_tokens = num_cached
            self.counters.prefix_cache_queries += seq.num_tokens
            self.counters.prefix_cache_hits += num_cached
            batch.add(seq, num_new)
            budget -= num_new

    def _reusable_prefix(self, seq: Sequence) -> list[int]:
        """Computed blocks seq can start from: prefix-cache hits, else its leader's prompt blocks."""
        cached = self.block_manager.find_cached_prefix(seq)
        leader = seq.request.leader
        if cached or seq is leader or leader.status is not SequenceStatus.RUNNING or leader.is_prefilling:
            return cached
        return leader.block_table[: (seq.num_prompt_tokens - 1) // self.block_manager.block_size]

    def _chunk(self, seq: Sequence, num_uncomputed: int, budget: int) -> int:
        if num_uncomputed > budget:
            self.counters.num_chunked_prefills += 1
            return budget
        return num_uncomputed

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first in line for recompute."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.counters.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence that just finished (or was aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
