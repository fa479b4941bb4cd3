"""BlockManager: allocation, ref counts, prefix-cache hits, LRU eviction, no leaks."""

import pytest

from engine.block_manager import FREED_BLOCK, BlockManager, hash_block
from engine.core_messages import EngineCoreRequest
from engine.sampling import SamplingParams
from engine.sequence import Request, Sequence

BLOCK = 4


def make_seq(tokens: list[int], n: int = 1) -> Sequence:
    request = Request(EngineCoreRequest("r", tokens, SamplingParams(n=n), arrival_time=0.0, max_tokens=16))
    return request.seqs[0]


def compute_all(manager: BlockManager, seq: Sequence) -> None:
    """What the engine does after a step: the scheduled tokens are now in the cache."""
    assert manager.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.cache_computed_blocks(seq)


def test_hash_is_stable_and_chained():
    assert hash_block(b"", [1, 2, 3]) == hash_block(b"", [1, 2, 3])
    assert hash_block(b"", [1, 2, 3]) != hash_block(b"", [1, 2, 4])
    assert hash_block(hash_block(b"", [9]), [1]) != hash_block(hash_block(b"", [8]), [1])
    # A constant from a previous run: Python's salted hash() would change between processes.
    assert hash_block(b"", [1, 2, 3]).hex() == hash_block(b"", [1, 2, 3]).hex()
    assert len(hash_block(b"", [])) == 16


def test_allocate_grows_block_by_block_and_free_returns_everything():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    seq = make_seq(list(range(10)))
    assert manager.allocate(seq, 10)
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 5
    seq.num_computed_tokens = 10
    seq.token_ids += [10, 11]
    assert manager.allocate(seq, 2)  # positions 10, 11 still fit block 3
    assert len(seq.block_table) == 3
    seq.num_computed_tokens = 12
    seq.token_ids.append(12)
    assert manager.allocate(seq, 1)
    assert len(seq.block_table) == 4
    manager.free(seq)
    assert manager.num_free_blocks == 8 and seq.block_table == [] and seq.num_computed_tokens == 0


def test_allocation_failure_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=BLOCK, enable_prefix_caching=False)
    seq = make_seq(list(range(13)))
    assert not manager.allocate(seq, 13)  # needs 4 blocks
    assert seq.block_table == [] and manager.num_free_blocks == 3
    assert manager.allocate(seq, 12)
    assert manager.num_free_blocks == 0


def test_prefix_hits_share_full_blocks_and_keep_the_last_token_uncomputed():
    manager = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    first = make_seq(list(range(12)))  # three full blocks
    compute_all(manager, first)
    second = make_seq(list(range(12)))
    hits = manager.find_cached_prefix(second)
    assert hits == first.block_table[:2]  # not the third: the last token must be computed again
    assert manager.allocate(second, 4, hits)
    assert second.num_computed_tokens == 8
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert manager.ref_counts[hits[0]] == 2
    third = make_seq(list(range(8)) + [99, 98, 97, 96, 95])
    assert manager.find_cached_prefix(third) == first.block_table[:2]
    other = make_seq([5] + list(range(1, 12)))
    assert manager.find_cached_prefix(other) == []  # chain hash: a different first block misses all


def test_unreferenced_cached_blocks_stay_reusable_until_evicted_lru():
    manager = BlockManager(num_blocks=4, block_size=BLOCK, enable_prefix_caching=True)
    old = make_seq([1] * 8 + [0])
    compute_all(manager, old)
    manager.free(old)
    assert manager.num_free_blocks == 4  # cached blocks count as free
    again = make_seq([1] * 8 + [0])
    assert len(manager.find_cached_prefix(again)) == 2
    # Three blocks of new content: the never-used and uncached blocks go first, then the
    # cached prefix is evicted from its deepest block, so its root block survives.
    newer = make_seq([2] * 12)
    compute_all(manager, newer)
    assert len(manager.find_cached_prefix(make_seq([1] * 8 + [0]))) == 1
    manager.free(newer)
    assert manager.num_free_blocks == 4


def test_shared_blocks_that_are_free_count_against_capacity():
    manager = BlockManager(num_blocks=3, block_size=BLOCK, enable_prefix_caching=True)
    first = make_seq(list(range(9)))
    compute_all(manager, first)
    manager.free(first)
    second = make_seq(list(range(8)) + list(range(100, 106)))  # 14 tokens: 4 blocks
    hits = manager.find_cached_prefix(second)
    assert len(hits) == 2
    # Needs 2 new blocks on top of the 2 hits, but only 1 block is neither free-and-hit.
    assert not manager.allocate(second, 6, hits)
    assert second.block_table == [] and manager.num_free_blocks == 3


@pytest.mark.parametrize("caching", [True, False])
def test_no_leak_after_many_sequences(caching):
    manager = BlockManager(num_blocks=20, block_size=BLOCK, enable_prefix_caching=caching)
    seqs = [make_seq([i % 3] * (5 + i)) for i in range(6)]
    for seq in seqs:
        hits = manager.find_cached_prefix(seq)
        assert manager.allocate(seq, seq.num_tokens - len(hits) * BLOCK, hits)
        seq.num_computed_tokens = seq.num_tokens
        manager.cache_computed_blocks(seq)
    for seq in seqs:
        manager.free(seq)
    assert manager.num_free_blocks == 20
    assert all(count == 0 for count in manager.ref_counts)


# Sliding window: blocks wholly outside every layer's window are released ----------------------


def test_blocks_wholly_outside_the_window_are_released_as_the_sequence_grows():
    manager = BlockManager(num_blocks=10, block_size=BLOCK, enable_prefix_caching=False)
    seq = make_seq(list(range(20)))
    compute_all(manager, seq)  # positions 0..19 in 5 blocks; the next query (20) sees 13..20
    table = list(seq.block_table)
    assert manager.free_blocks_outside_window(seq, window=8) == 3
    assert seq.block_table == [FREED_BLOCK] * 3 + table[3:]
    assert manager.num_free_blocks == 10 - 2
    assert all(manager.ref_counts[block] == 0 for block in table[:3])
    assert manager.free_blocks_outside_window(seq, window=8) == 0  # nothing more until it grows
    seq.token_ids += [20, 21, 22, 23]
    assert manager.allocate(seq, 4)  # the new block lands at index 5: positions keep their block index
    assert len(seq.block_table) == 6 and seq.block_table[5] in table[:3]  # a released block, reused
    seq.num_computed_tokens = 24
    assert manager.free_blocks_outside_window(seq, window=8) == 1  # 24 - 8 + 1 = 17: block 3 is dead
    manager.free(seq)
    assert manager.num_free_blocks == 10 and all(count == 0 for count in manager.ref_counts)


def test_window_longer_than_the_context_releases_nothing():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    seq = make_seq(list(range(12)))
    compute_all(manager, seq)
    assert manager.free_blocks_outside_window(seq, window=13) == 0
    assert manager.free_blocks_outside_window(seq, window=9) == 1  # the next query (12) sees 4..12


def test_a_block_shared_with_another_sequence_stays_allocated_for_it():
    manager = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    first = make_seq(list(range(12)) + [50])
    compute_all(manager, first)
    second = make_seq(list(range(12)) + [60])
    hits = manager.find_cached_prefix(second)
    assert manager.allocate(second, 1, hits)
    free_before = manager.num_free_blocks
    assert manager.free_blocks_outside_window(first, window=4) == 2  # next query 13 sees 10..13: blocks 0, 1 dead
    assert manager.num_free_blocks == free_before  # second still holds them
    assert [manager.ref_counts[block] for block in hits] == [1, 1, 2]
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 16 and all(count == 0 for count in manager.ref_counts)


def test_released_cached_blocks_still_serve_prefix_hits():
    manager = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=True)
    long_running = make_seq(list(range(16)) + [7])
    compute_all(manager, long_running)
    assert manager.free_blocks_outside_window(long_running, window=4) == 3
    newcomer = make_seq(list(range(16)) + [8])
    assert len(manager.find_cached_prefix(newcomer)) == 4
