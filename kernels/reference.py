"""Torch reference implementations of the paged-attention kernels.

They define the semantics the Triton kernels must match, and they are the
attention path on CPU. The KV cache layout shared by all of them:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

A token at position p of a sequence lives in block block_table[p // block_size]
at offset p % block_size; its flat slot is block * block_size + offset.

With a sliding window W, the query at position p attends to positions
p - W + 1 .. p only, and blocks wholly before the first query's window are
never read (the block manager may have handed them to another sequence).

An FP8 cache (float8_e4m3fn) holds K / k_scale and V / v_scale, clamped to the
format's range; every reader multiplies by the scale again. k_scale and
v_scale are one-element float32 tensors (a layer's per-tensor scales) and are
used only when the cache is FP8.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """x as stored in a cache of cache_dtype: divided by scale, clamped and rounded when it is FP8."""
    if cache_dtype != FP8_DTYPE:
        return x.to(cache_dtype)
    scaled = x.float() / _scale_or_one(scale, x.device)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(cached: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache entries as dtype values: FP8 ones multiplied by their scale."""
    if cached.dtype != FP8_DTYPE:
        return cached.to(dtype)
    return (cached.float() * _scale_or_one(scale, cached.device)).to(dtype)


def _scale_or_one(scale: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    return torch.ones((), device=device) if scale is None else scale.float()


def store_kvcache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int; negative slots (padding) are skipped
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter this step's K/V into their cache slots (quantized when the cache is FP8)."""
    block_size = k_cache.shape[1]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    slots = slot_mapping.long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = quantize_kv(key, k_cache.dtype, k_scale)
    v_cache[blocks, offsets] = quantize_kv(value, v_cache.dtype, v_scale)


def gather_kv(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, start: int = 0
) -> torch.Tensor:
    """Cached tokens start..seq_len - 1 of one sequence: [seq_len - start, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    first_block = start // block_size
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[first_block:num_blocks].long()
    return cache[blocks].flatten(0, 1)[start - first_block * block_size : seq_len - first_block * block_size]


def _attend(
    q: torch.Tensor,  # [Lq, Hq, D]
    k: torch.Tensor,  # [Lk, Hkv, D]
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Causal attention where the Lq queries are the last Lq of the Lk positions."""
    num_q, num_heads, _ = q.shape
    num_k, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(num_k - num_q, num_k, device=q.device)[:, None]
    k_pos = torch.arange(num_k, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if sliding_window is not None:
        hidden |= k_pos <= q_pos - sliding_window
    scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim], queries of B sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor,  # [B] int32, context length including this step's tokens
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention over the paged cache (prefill, chunked prefill, prefix hits, decode).

    Query i of sequence b sits at position seq_lens[b] - q_len_b + i and attends
    to cache positions 0..that position. The step's K/V must already be stored.
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        # With a window, only positions from the first query's window on are read.
        start = max(0, seq_len - (hi - lo) - sliding_window + 1) if sliding_window is not None else 0
        k = dequantize_kv(gather_kv(k_cache, block_tables[b], seq_len, start), torch.float32, k_scale)
        v = dequantize_kv(gather_kv(v_cache, block_tables[b], seq_len, start), torch.float32, v_scale)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale, sliding_window)
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-token decode: the special case of prefill attention with one query each."""
    batch = q.shape[0]
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, sliding_window, k_scale, v_scale
    )
