"""The batched CPU attention backend against the per-sequence torch reference, on random paged problems."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_attention, reference
from kernels.random_inputs import make_paged_problem


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_matches_reference(num_heads, num_kv_heads, block_size):
    seq_lens = [1, 7, 33, 16, 50]
    p = make_paged_problem(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, 32, block_size, seed=3)
    args = (p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale)
    torch.testing.assert_close(cpu_attention.paged_decode_attention(*args), reference.paged_decode_attention(*args))


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (6, 2)])
def test_mixed_step_matches_reference(num_heads, num_kv_heads):
    """Whole prefills, a chunk after a prefix hit, and decodes in one step."""
    seq_lens = [20, 9, 40, 3, 26, 1]
    query_lens = [20, 1, 12, 1, 1, 1]
    p = make_paged_problem(seq_lens, query_lens, num_heads, num_kv_heads, 16, 8, seed=5)
    args = (p.q, p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens, p.scale)
    torch.testing.assert_close(cpu_attention.paged_prefill_attention(*args), reference.paged_prefill_attention(*args))


@pytest.mark.parametrize("window", [None, 6, 20, 64])
def test_mixed_step_with_a_sliding_window_matches_reference(window):
    """Whole prompts shorter and longer than the window (SDPA's own causal mask only where the window covers all)."""
    seq_lens = [20, 9, 40, 6, 1]
    query_lens = [20, 1, 12, 6, 1]
    p = make_paged_problem(seq_lens, query_lens, 6, 2, 16, 8, seed=11)
    args = (p.q, p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens, p.scale, window)
    torch.testing.assert_close(cpu_attention.paged_prefill_attention(*args), reference.paged_prefill_attention(*args))


def test_half_precision_matches_reference_within_rounding():
    p = make_paged_problem([30, 5], [30, 1], 4, 2, 16, 8, dtype=torch.bfloat16, seed=7)
    args = (p.q, p.k_cache, p.v_cache, p.block_tables, p.query_start_loc, p.seq_lens, p.scale)
    got = cpu_attention.paged_prefill_attention(*args)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference.paged_prefill_attention(*args).float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("seq_lens", [[37], [1, 7, 33, 16, 50]])
@pytest.mark.parametrize("window", [None, 5, 16, 64])
def test_decode_with_a_step_context_matches_reference(seq_lens, window):
    """One DecodeContext serves layers of different windows (Gemma 3); a lone sequence takes the unmasked path."""
    p = make_paged_problem(seq_lens, [1] * len(seq_lens), 6, 2, 32, 4, seed=11)
    context = cpu_attention.DecodeContext(p.block_tables, p.seq_lens, block_size=4)
    for sliding_window in (window, None):
        args = (p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale, sliding_window)
        torch.testing.assert_close(cpu_attention.paged_decode_attention(*args, context=context),
                                   reference.paged_decode_attention(*args))


def test_store_skips_padding_slots_like_the_reference():
    gen = torch.Generator().manual_seed(2)
    k_cache, v_cache = (torch.randn(6, 4, 2, 8, generator=gen) for _ in range(2))
    key, value = (torch.randn(5, 2, 8, generator=gen) for _ in range(2))
    slots = torch.tensor([3, -1, 17, 22, -1])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(key, value, expected_k, expected_v, slots)
    cpu_attention.store_kvcache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
