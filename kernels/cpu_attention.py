"""Paged attention on CPU: batched gathers and one SDPA call per decode step.

kernels/reference.py states the semantics with a loop of small einsums per
sequence, each copying K/V once per query head; on CPU that loop was most of a
decode step. Here a decode step gathers every sequence's cached K/V with one
indexing operation and attends with one `scaled_dot_product_attention` call;
a prefill attends per sequence (each is a large operation already). Grouped
query heads are folded into the query length, [kv_heads, group * q_len, D],
so K/V are never repeated per query head.

Same signatures as the reference and the Triton kernels (engine.layers.attention
picks the backend). An FP8 cache is dequantized as it is gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import dequantize_kv, gather_kv, quantize_kv

__all__ = ["DecodeContext", "StoreSlots", "paged_decode_attention", "paged_prefill_attention", "store_kvcache"]


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Lq, Hq, D] -> [..., Hkv, group * Lq, D]: query head h reads KV head h // group."""
    *lead, num_q, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    q = q.reshape(*lead, num_q, num_kv_heads, group, head_dim)
    return q.movedim(-4, -2).reshape(*lead, num_kv_heads, group * num_q, head_dim)


def _ungrouped(out: torch.Tensor, num_q: int) -> torch.Tensor:
    """The inverse of _grouped: [..., Hkv, group * Lq, D] -> [..., Lq, Hq, D]."""
    *lead, num_kv_heads, rows, head_dim = out.shape
    out = out.reshape(*lead, num_kv_heads, rows // num_q, num_q, head_dim)
    return out.movedim(-2, -4).reshape(*lead, num_q, num_kv_heads * (rows // num_q), head_dim)


class StoreSlots:
    """The step's cache slots as int64 and, when some are padding (negative), the rows to keep: once per step."""

    def __init__(self, slot_mapping: torch.Tensor):
        valid = slot_mapping >= 0
        self.rows = None if bool(valid.all()) else valid.nonzero()[:, 0]
        self.slots = (slot_mapping if self.rows is None else slot_mapping[self.rows]).long()


def store_kvcache(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], contiguous
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int; negative slots (padding) are skipped
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    store_slots: StoreSlots | None = None,
) -> None:
    """Copy this step's K/V into their slots of the flattened cache (kernels.reference.store_kvcache's semantics)."""
    slots = store_slots or StoreSlots(slot_mapping)
    if slots.rows is not None:
        key, value = key[slots.rows], value[slots.rows]
    for cache, new, cache_scale in ((k_cache, key, k_scale), (v_cache, value, v_scale)):
        stored = quantize_kv(new, cache.dtype, cache_scale)
        if cache.dtype.itemsize == 1:  # torch has no CPU index_copy_ for float8 types: copy the bytes
            cache, stored = cache.view(torch.uint8), stored.view(torch.uint8)
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots.slots, stored)


class DecodeContext:
    """Where each sequence's context sits in the flattened cache, and which positions its query sees.

    The same for every layer of a decode step, so the engine builds it once per
    step (AttentionMetadata.cpu_decode_context) instead of once per layer: a
    30-layer model then gathers with one indexing operation per K and V per
    layer and nothing else. A step of one sequence needs no mask at all (its
    context is gathered exactly), so SDPA takes its unmasked path.
    """

    def __init__(self, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
        batch = seq_lens.shape[0]
        max_len = int(seq_lens.max())
        positions = torch.arange(max_len, device=seq_lens.device)
        tables = block_tables[:, : -(-max_len // block_size)].long()
        # [B, L] flat slot (block * block_size + offset) of each context position; padding reads slot 0.
        self.slots = tables.repeat_interleave(block_size, dim=1)[:, :max_len] * block_size + positions % block_size
        self.lengths = seq_lens[:, None].to(positions.dtype)
        self.positions = positions
        self.max_len = max_len
        self._masks: dict[int | None, torch.Tensor | None] = {None: None if batch == 1 else self._mask(None)}

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """[B, 1, 1, L] bool, True where attended; None when every gathered position is."""
        if sliding_window is not None and sliding_window >= self.max_len:
            sliding_window = None  # the window reaches back past every sequence's start
        if sliding_window not in self._masks:
            self._masks[sliding_window] = self._mask(sliding_window)
        return self._masks[sliding_window]

    def _mask(self, sliding_window: int | None) -> torch.Tensor:
        mask = self.positions[None, :] < self.lengths
        if sliding_window is not None:
            mask &= self.positions[None, :] >= self.lengths - sliding_window
        return mask[:, None, None, :]


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    context: DecodeContext | None = None,
) -> torch.Tensor:
    """Every sequence's whole context gathered at once, padded positions masked, one SDPA call.

    With a sliding window, positions more than sliding_window - 1 before the query are masked too.
    context: the step's DecodeContext when the caller keeps one (built here otherwise).
    """
    batch, num_heads, _ = q.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if context is None:
        context = DecodeContext(block_tables, seq_lens, block_size)
    # [B, L, Hkv, D] -> [B, Hkv, L, D]
    k = dequantize_kv(k_cache.view(-1, num_kv_heads, head_dim)[context.slots], q.dtype, k_scale).transpose(1, 2)
    v = dequantize_kv(v_cache.view(-1, num_kv_heads, head_dim)[context.slots], q.dtype, v_scale).transpose(1, 2)
    # One query per sequence: _grouped's layout is a plain reshape, [B, Hq, D] -> [B, Hkv, group, D].
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(
        grouped, k, v, attn_mask=context.mask(sliding_window), scale=scale
    )
    return out.reshape(batch, num_heads, head_dim)


def _causal_attention(
    q: torch.Tensor,  # [Lq, Hq, D]: the last Lq positions of the context
    k: torch.Tensor,  # [Hkv, L, D], the whole context
    v: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """One sequence's causal attention, [Lq, Hq, D], through torch's fused CPU kernel (4-d inputs only: 3-d ones
    fall back to the unfused math path, about 4x slower for a 1,024-token prompt)."""
    num_q, seq_len, num_kv_heads = q.shape[0], k.shape[1], k.shape[0]
    if num_q == seq_len and (sliding_window is None or sliding_window >= seq_len):
        # A whole prompt: SDPA's own causal mask, whose kernel skips the blocks above the diagonal (half the
        # work of an explicit mask), query heads reading their KV head in place (enable_gqa).
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True, scale=scale,
                                             enable_gqa=True)
        return out[0].transpose(0, 1)
    q_pos = torch.arange(seq_len - num_q, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    causal = k_pos <= q_pos[:, None]  # [Lq, L]
    if sliding_window is not None:
        causal &= k_pos > q_pos[:, None] - sliding_window
    mask = causal.repeat(q.shape[1] // num_kv_heads, 1)  # rows follow _grouped: group-major, then query position
    out = F.scaled_dot_product_attention(_grouped(q, num_kv_heads)[None], k[None], v[None], attn_mask=mask, scale=scale)
    return _ungrouped(out[0], num_q)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim], queries of B sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including this step's tokens
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention: the one-token queries of a mixed step go through one decode call."""
    starts = query_start_loc.tolist()
    query_lens = [hi - lo for lo, hi in zip(starts[:-1], starts[1:])]
    out = torch.empty_like(q)
    single = [b for b, n in enumerate(query_lens) if n == 1]
    if single:
        rows = torch.tensor([starts[b] for b in single], device=q.device)
        picked = torch.tensor(single, device=q.device)
        out[rows] = paged_decode_attention(
            q[rows], k_cache, v_cache, block_tables[picked], seq_lens[picked], scale, sliding_window, k_scale, v_scale
        )
    lens = seq_lens.tolist()
    for b, num_q in enumerate(query_lens):
        if num_q <= 1:
            continue
        lo, seq_len = starts[b], lens[b]
        k = dequantize_kv(gather_kv(k_cache, block_tables[b], seq_len), q.dtype, k_scale).transpose(0, 1)  # [Hkv, L, D]
        v = dequantize_kv(gather_kv(v_cache, block_tables[b], seq_len), q.dtype, v_scale).transpose(0, 1)
        out[lo : lo + num_q] = _causal_attention(q[lo : lo + num_q], k, v, scale, sliding_window)
    return out
