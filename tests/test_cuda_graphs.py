"""CUDA-graph shapes and padding, on CPU: which graph a step gets, and what a padded step does.

Capturing needs a GPU (tests/test_gpu.py compares graph tokens with eager ones).
What makes padding safe is checked here: the static buffers a padded step
leaves behind, and the Triton kernels run on them against the same step
unpadded (interpreted on CPU, compiled where a GPU is present).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kernels
from engine.attention_metadata import AttentionMetadata
from engine.config import DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE, EngineConfig
from engine.cuda_graphs import (
    GraphShape,
    StaticInputs,
    StepCounts,
    StepGraphs,
    decode_batch_sizes,
    decode_shapes,
    mixed_shapes,
    mixed_token_counts,
    smallest_fitting,
)
from engine.errors import ConfigError
from kernels import reference
from kernels.random_inputs import make_paged_problem

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("max_tokens", [2, 16, 17, 100, 128, 129, 2048, 2049, 8192])
def test_mixed_token_counts_rise_in_small_steps_to_the_bound(max_tokens):
    counts = mixed_token_counts(max_tokens)
    assert counts == sorted(set(counts)) and counts[-1] == max_tokens and counts[0] <= 16
    for smaller, larger in zip(counts, counts[1:]):
        assert larger - smaller <= (64 if larger <= 128 else 128 if larger <= 2048 else 256)


def test_default_bound_captures_nineteen_mixed_graphs():
    assert mixed_token_counts(2048) == [16, 32, 64, *range(128, 2049, 128)]


def test_decode_shapes_stop_at_max_num_seqs_or_the_token_bound():
    assert decode_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert [s.num_tokens for s in decode_shapes(256, 2048)][-3:] == [224, 240, 256]
    assert decode_shapes(256, 100)[-1] == GraphShape(100, 100)
    assert all(s.num_tokens == s.num_seqs for s in decode_shapes(64, 2048))


def test_mixed_shapes_leave_room_for_a_padding_sequence():
    shapes = mixed_shapes(max_num_seqs=20, max_tokens=64)
    assert shapes == [GraphShape(16, 16), GraphShape(32, 21), GraphShape(64, 21)]
    assert mixed_shapes(max_num_seqs=20, max_tokens=1) == []  # a mixed step has two tokens or more


def test_smallest_fitting_shape():
    shapes = decode_shapes(256, 2048)
    assert smallest_fitting(shapes, 5, 5) == GraphShape(8, 8)
    assert smallest_fitting(shapes, 17, 17) == GraphShape(32, 32)
    assert smallest_fitting(shapes, 257, 257) is None


def test_a_mixed_step_gets_one_more_sequence_than_it_has():
    graphs = StepGraphs(nn.Identity(), mixed_shapes(max_num_seqs=4, max_tokens=64), decode_only=False,
                        max_blocks_per_seq=4, device=torch.device("cpu"))
    # 4 sequences (one of them a chunk) in 10 tokens: the padding tokens are a fifth sequence.
    assert graphs.shape_for(10, 4) == GraphShape(16, 5)
    assert graphs.shape_for(33, 4) == GraphShape(64, 5)
    assert graphs.shape_for(65, 2) is None  # past the bound: eager


def test_capture_size_defaults_and_is_bounded_by_the_token_budget():
    resolved = EngineConfig(model="m", device="cpu").resolve(model_max_len=4096, checkpoint_dtype=None)
    assert resolved.max_cudagraph_capture_size == DEFAULT_MAX_CUDAGRAPH_CAPTURE_SIZE
    small_budget = EngineConfig(model="m", device="cpu", max_num_batched_tokens=512, max_cudagraph_capture_size=4096)
    assert small_budget.resolve(4096, None).max_cudagraph_capture_size == 512
    with pytest.raises(ConfigError, match="max_cudagraph_capture_size"):
        EngineConfig(model="m", max_cudagraph_capture_size=-3)


def test_step_counts_since():
    assert StepCounts(5, 7, 2).since(StepCounts(1, 2, 2)) == StepCounts(4, 5, 0)


# A padded step -------------------------------------------------------------------------------

BLOCK_SIZE = 16


def step_metadata(seq_lens: list[int], query_lens: list[int], block_tables: torch.Tensor) -> AttentionMetadata:
    """The metadata of a step whose sequence b adds its last query_lens[b] of seq_lens[b] tokens."""
    slots = [int(block_tables[b, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE
             for b, (s, q) in enumerate(zip(seq_lens, query_lens)) for pos in range(s - q, s)]
    starts = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=block_tables.device),
        query_start_loc=starts.to(block_tables.device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=block_tables.device),
        block_tables=block_tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def test_fill_pads_tokens_with_slot_minus_one_and_sequences_with_length_zero():
    largest = GraphShape(64, 9)
    static = StaticInputs(largest, max_blocks_per_seq=6, device=torch.device("cpu"))
    tables = torch.arange(8 * 4, dtype=torch.int32).view(8, 4)
    big = step_metadata([40] * 8, [5, 5, 5, 5, 5, 5, 5, 5], tables)
    static.fill(torch.ones(40, dtype=torch.int64), torch.ones(40, dtype=torch.int64), big, largest, decode_only=False)

    # A smaller step afterwards: nothing of the big one may survive in the padded part.
    small = step_metadata([3, 20, 1], [1, 12, 1], tables[:3, :2])
    shape = GraphShape(32, 9)
    ids, positions = torch.arange(14), torch.arange(14)
    static.fill(ids, positions, small, shape, decode_only=False)
    meta = static.metadata(shape, decode_only=False)
    assert torch.equal(meta.slot_mapping[:14], small.slot_mapping)
    assert (meta.slot_mapping[14:] == -1).all()  # nothing stored for padding tokens
    assert meta.query_start_loc.tolist() == [0, 1, 13, 14] + [32] * 6  # padding tokens: sequence 3's
    assert meta.seq_lens.tolist() == [3, 20, 1] + [0] * 6  # padding sequences read nothing
    assert torch.equal(meta.block_tables[:3, :2], tables[:3, :2])
    assert torch.equal(static.input_ids[:14], ids) and torch.equal(static.positions[:14], positions)
    assert meta.max_query_len > 1  # the varlen kernel, not the decode kernel


def test_fill_of_a_decode_step_keeps_one_query_per_sequence():
    shape = GraphShape(8, 8)
    static = StaticInputs(shape, max_blocks_per_seq=4, device=torch.device("cpu"))
    tables = torch.arange(6, dtype=torch.int32).view(3, 2)
    static.fill(torch.arange(3), torch.arange(3), step_metadata([5, 17, 2], [1, 1, 1], tables), shape,
                decode_only=True)
    meta = static.metadata(shape, decode_only=True)
    assert meta.query_start_loc.tolist() == list(range(9)) and meta.decode_only
    assert meta.seq_lens.tolist() == [5, 17, 2] + [0] * 5 and (meta.slot_mapping[3:] == -1).all()


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_a_padded_mixed_step_gives_the_same_real_rows_and_stores_only_real_slots(sliding_window):
    # Decode rows, a chunk behind a cached prefix and a whole prompt: one mixed step.
    seq_lens, query_lens = [20, 37, 1, 9, 33], [1, 17, 1, 9, 1]
    num_heads, num_kv_heads, head_dim = 8, 2, 64
    p = make_paged_problem(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, BLOCK_SIZE, device=DEVICE)
    meta = step_metadata(seq_lens, query_lens, p.block_tables)
    num_tokens = sum(query_lens)
    gen = torch.Generator().manual_seed(1)
    k_new, v_new = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))

    def run(q, k, v, meta):
        k_cache, v_cache = p.k_cache.clone(), p.v_cache.clone()
        kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.query_start_loc,
                                              meta.seq_lens, p.scale, sliding_window=sliding_window)
        return out, k_cache, v_cache

    eager, k_eager, v_eager = run(p.q, k_new, v_new, meta)

    shape = GraphShape(48, 7)
    static = StaticInputs(shape, max_blocks_per_seq=p.block_tables.shape[1] + 3, device=DEVICE)
    no_ids = torch.zeros(num_tokens, dtype=torch.int64, device=DEVICE)
    static.fill(no_ids, no_ids, meta, shape, decode_only=False)
    padding = shape.num_tokens - num_tokens

    def padded(x: torch.Tensor) -> torch.Tensor:  # padding rows hold whatever earlier steps left: large values
        return torch.cat([x, 1e3 * torch.randn(padding, *x.shape[1:], generator=gen).to(DEVICE)])

    graph, k_graph, v_graph = run(padded(p.q), padded(k_new), padded(v_new), static.metadata(shape, False))

    assert torch.equal(k_graph, k_eager) and torch.equal(v_graph, v_eager)  # padding stored nowhere
    assert torch.equal(graph[:num_tokens], eager)
    assert torch.equal(graph[num_tokens:], torch.zeros_like(graph[num_tokens:]))  # finite rows for later layers
    expected = reference.paged_prefill_attention(p.q, k_eager, v_eager, p.block_tables, p.query_start_loc,
                                                 p.seq_lens, p.scale, sliding_window)
    assert (eager - expected).norm() / expected.norm() < 1e-4


def test_the_tile_search_serves_many_sequences_including_ones_without_queries():
    # 40 sequences of 0..23 queries (0: a padding sequence between real ones), so tiles of one
    # program's binary search land on every kind of neighbour.
    query_lens = [(7 * b) % 24 for b in range(40)]
    seq_lens = [q + (5 * b) % 30 for b, q in enumerate(query_lens)]
    seq_lens = [max(s, 1) for s in seq_lens]
    p = make_paged_problem(seq_lens, query_lens, 4, 2, 64, BLOCK_SIZE, device=DEVICE)
    out = kernels.paged_prefill_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.query_start_loc,
                                          p.seq_lens, p.scale)
    expected = reference.paged_prefill_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.query_start_loc,
                                                 p.seq_lens, p.scale)
    assert (out - expected).norm() / expected.norm() < 1e-4
