"""Scheduler without a model: budgets, chunked prefill, preemption order, n > 1 sharing, no leaks."""

import numpy as np

from engine.block_manager import BlockManager
from engine.core_messages import EngineCoreRequest
from engine.sampling import SamplingParams
from engine.scheduler import SampledTokens, ScheduledBatch, Scheduler
from engine.sequence import Request, SequenceStatus

BLOCK = 4


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=64, caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK, caching), max_num_seqs, budget, max_model_len=1000)


def add(scheduler: Scheduler, rid: str, prompt_len: int, n: int = 1, max_tokens: int = 8, first: int = 0) -> Request:
    tokens = [first + i for i in range(prompt_len)]
    request = Request(EngineCoreRequest(rid, tokens, SamplingParams(n=n, max_tokens=max_tokens), 0.0, max_tokens))
    scheduler.add_request(request)
    return request


def run_step(scheduler: Scheduler) -> ScheduledBatch:
    """One step without a model: each sampling sequence gets token 1000 + its output index."""
    batch = scheduler.schedule()
    sampled = [1000 + seq.num_output_tokens - 1 for seq in batch.sampling_seqs]
    scheduler.update(batch, SampledTokens(np.array(sampled, dtype=np.int64)))
    return batch


def run_to_completion(scheduler: Scheduler, max_steps: int = 500) -> int:
    steps = 0
    while scheduler.has_unfinished():
        run_step(scheduler)
        steps += 1
        assert steps < max_steps, "the scheduler made no progress"
    return steps


def test_decodes_and_prefills_share_one_step_within_the_budgets():
    scheduler = make_scheduler(max_num_seqs=3, budget=10)
    a = add(scheduler, "a", 6).leader
    batch = run_step(scheduler)
    assert batch.seqs == [a] and batch.num_new_tokens == [6] and batch.samples == [True]
    b = add(scheduler, "b", 20, first=100).leader
    add(scheduler, "c", 3, first=200)
    add(scheduler, "d", 3, first=300)
    batch = run_step(scheduler)
    # a decodes (1 token), b's prompt is chunked to the 9 tokens left; c and d wait for budget.
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 9] and batch.samples == [True, False]
    assert scheduler.counters.num_chunked_prefills == 1
    batch = run_step(scheduler)
    assert batch.num_new_tokens[:2] == [1, 9] and batch.num_tokens == 10  # c gets no room either
    batch = run_step(scheduler)
    assert [s.request.request_id for s in batch.seqs] == ["a", "b", "c"]
    assert batch.num_new_tokens == [1, 2, 3] and batch.samples == [True, True, True]
    assert len(scheduler.running) == 3  # max_num_seqs: d still waits
    run_to_completion(scheduler)
    assert scheduler.block_manager.num_free_blocks == 64


def test_preemption_takes_the_newest_and_resumes_it_with_its_tokens():
    scheduler = make_scheduler(num_blocks=6, caching=False)
    old = add(scheduler, "old", 8, max_tokens=12).leader
    new = add(scheduler, "new", 8, max_tokens=12, first=50).leader
    run_step(scheduler)  # both prefilled: 2 blocks each, 2 left
    for _ in range(4):
        run_step(scheduler)  # both decode into a third block each: none left
    assert scheduler.block_manager.num_free_blocks == 0 and old.num_tokens == 13
    run_step(scheduler)  # old needs a fourth block: new is preempted
    assert scheduler.counters.num_preemptions == 1
    assert new.status is SequenceStatus.WAITING and scheduler.waiting[0] is new
    assert new.num_computed_tokens == 0 and new.block_table == []
    generated = new.output_token_ids
    assert len(generated) == 5
    run_to_completion(scheduler)
    assert new.output_token_ids[:5] == generated and new.num_output_tokens == 12
    assert old.num_output_tokens == 12
    assert scheduler.block_manager.num_free_blocks == 6


def test_a_lone_sequence_that_runs_out_preempts_itself_and_later_resumes():
    scheduler = make_scheduler(num_blocks=3, caching=False)
    a = add(scheduler, "a", 8, max_tokens=4).leader
    b = add(scheduler, "b", 3, max_tokens=4, first=30).leader
    run_to_completion(scheduler)
    assert a.num_output_tokens == 4 and b.num_output_tokens == 4
    assert scheduler.counters.num_preemptions >= 1
    assert scheduler.block_manager.num_free_blocks == 3


def test_prefix_cache_hits_are_counted_in_tokens():
    scheduler = make_scheduler()
    add(scheduler, "a", 13)
    run_step(scheduler)
    add(scheduler, "b", 13)  # same prompt: 3 full blocks cached, all reusable (13 - 1 >= 12)
    run_step(scheduler)
    counters = scheduler.counters
    assert counters.prefix_cache_queries == 26 and counters.prefix_cache_hits == 12
    run_to_completion(scheduler)
    assert scheduler.block_manager.num_free_blocks == 64


def test_n_siblings_wait_for_the_leaders_prompt_and_share_its_blocks():
    scheduler = make_scheduler(caching=False)
    request = add(scheduler, "r", 14, n=3)
    leader, second, third = request.seqs
    scheduler.max_num_batched_tokens = 8
    batch = run_step(scheduler)
    assert batch.seqs == [leader]  # siblings do not start their own copy of the prompt
    run_step(scheduler)
    batch = run_step(scheduler)
    assert second in batch.seqs and third in batch.seqs
    assert second.block_table[:3] == leader.block_table[:3] == third.block_table[:3]
    assert scheduler.block_manager.ref_counts[leader.block_table[0]] == 3
    assert batch.num_new_tokens[batch.seqs.index(second)] == 2  # 14 - 12 shared tokens
    run_to_completion(scheduler)
    assert all(seq.num_output_tokens == 8 for seq in request.seqs)
    assert scheduler.block_manager.num_free_blocks == 64


def test_abort_of_a_waiting_or_running_sequence_frees_its_blocks():
    scheduler = make_scheduler(budget=16)
    running = add(scheduler, "a", 10).leader
    waiting = add(scheduler, "b", 30, first=100).leader
    run_step(scheduler)
    assert running.block_table and waiting.block_table and waiting.is_prefilling
    scheduler.finish(running)
    scheduler.finish(waiting)
    assert not scheduler.has_unfinished()
    assert scheduler.block_manager.num_free_blocks == 64
