"""The load test's stand-in for the endpoint picker scores replicas as the picker's default profile does."""

from __future__ import annotations

import random

from benchmarks.routing import (BLOCK_TOKENS, Replica, block_hashes, metric_values, picker_choice, queue_scores,
                                shared_prefix_workload)
from benchmarks.workloads import Request

SYSTEM = list(range(100, 100 + 4 * BLOCK_TOKENS))


def test_block_hashes_chain_over_full_blocks_only():
    hashes = block_hashes(SYSTEM + [1, 2, 3])
    assert len(hashes) == 4  # the partial block is not cacheable
    assert block_hashes(SYSTEM) == hashes
    other = block_hashes([7] + SYSTEM[1:])
    assert all(a != b for a, b in zip(hashes, other)), "a different first token changes every later block"


def test_prefix_affinity_outweighs_a_slightly_longer_queue():
    warm, cold = Replica("warm", waiting=2), Replica("cold", waiting=1)
    warm.remember(block_hashes(SYSTEM))
    assert picker_choice([warm, cold], Request(SYSTEM + [5], 1), random.Random(0)) is warm


def test_without_a_prefix_the_shorter_queue_and_emptier_cache_win():
    busy, idle = Replica("busy", waiting=6, kv_usage=0.9), Replica("idle", waiting=0, kv_usage=0.1)
    assert picker_choice([busy, idle], Request([1] * 40, 1), random.Random(0)) is idle
    assert queue_scores([busy, idle]) == [0.0, 1.0]
    assert queue_scores([Replica("a", waiting=3), Replica("b", waiting=3)]) == [1.0, 1.0]


def test_the_chosen_replica_remembers_what_it_was_sent():
    first, second = Replica("a"), Replica("b")
    chosen = picker_choice([first, second], Request(SYSTEM, 1), random.Random(1))
    assert chosen.prefix_match(block_hashes(SYSTEM)) == 1.0
    other = second if chosen is first else first
    assert other.prefix_match(block_hashes(SYSTEM)) == 0.0


def test_metric_values_reads_the_picker_gauges():
    text = ('# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 3.0\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.25\nkubellm_num_requests_waiting{model_name="m"} 3.0\n')
    assert metric_values(text, ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")) == {
        "vllm:num_requests_waiting": 3.0, "vllm:kv_cache_usage_perc": 0.25}


def test_workload_shares_system_prompts():
    requests = shared_prefix_workload(500, 20, systems=3, system_len=32, question_len=4, output_len=2)
    prefixes = {tuple(request.prompt_token_ids[:32]) for request in requests}
    assert len(prefixes) == 3 and all(len(request.prompt_token_ids) == 36 for request in requests)
