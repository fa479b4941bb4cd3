"""Paged attention for one layer, and the single place that picks the kernel backend.

The runner allocates each layer's KV cache after a profiling pass and binds it
to `Attention.k_cache` / `.v_cache`. Until then (the profiling pass itself)
each sequence attends causally over its own new tokens only.

A layer with a sliding window W lets the query at position p attend to
positions p - W + 1 .. p only (Hugging Face's convention for Mistral and Gemma 3).

Each layer owns its FP8 KV-cache scales (`k_scale`, `v_scale`: float32 buffers,
1.0 unless the checkpoint has them; engine.layers.quantization.kv_cache); the
kernels use them when the bound cache is FP8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.attention_metadata import AttentionMetadata
from kernels import cpu_attention


def paged_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Store the step's K/V, then attend through the block tables (k_scale / v_scale: an FP8 cache's scales).

    The one backend switch: Triton kernels on CUDA (`kernels` imports them only
    when first used, so CPU never loads Triton), batched torch SDPA elsewhere.
    """
    if not q.is_cuda:
        return _cpu_paged_attention(q, k, v, k_cache, v_cache, meta, scale, sliding_window, k_scale, v_scale)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    kernels.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, **scales)
    if meta.decode_only:
        return kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, sliding_window=sliding_window, **scales
        )
    return kernels.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
        sliding_window=sliding_window, **scales,
    )


def _cpu_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> torch.Tensor:
    """The CPU backend, with the slot and context indexing it needs built once per step, not per layer."""
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    cpu_attention.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping, **scales,
                                store_slots=meta.cpu_store_slots())
    if meta.decode_only:
        return cpu_attention.paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, sliding_window=sliding_window, **scales,
            context=meta.cpu_decode_context(k_cache.shape[1]),
        )
    return cpu_attention.paged_prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
        sliding_window=sliding_window, **scales,
    )


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, num_kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        if self.k_cache is None or self.v_cache is None:
            return causal_attention_without_cache(
                q, k, v, meta.query_start_loc, self.scale, self.sliding_window
            ).flatten(1)
        return paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
                               self.k_scale, self.v_scale).flatten(1)


def causal_attention_without_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Each packed sequence attends causally over its own tokens (the profiling pass: no cache yet)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    starts = query_start_loc.tolist()
    for lo, hi in zip(starts[:-1], starts[1:]):
        if hi == lo:
            continue
        # [1, heads, len, head_dim]: SDPA's fused (flash / memory-efficient) kernels take 4-d inputs only;
        # 3-d ones run the math path, which materialises every head's score matrix and so inflates the
        # profiled activation peak that sizes the KV cache.
        qs, ks, vs = (t[lo:hi].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        if sliding_window is None:
            attended = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            mask = sliding_window_mask(hi - lo, hi - lo, sliding_window, q.device)
            attended = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[lo:hi] = attended[0].transpose(0, 1)
    return out


def sliding_window_mask(num_queries: int, num_keys: int, window: int, device: torch.device) -> torch.Tensor:
    """[num_queries, num_keys] bool, True where attended: the queries are the last num_queries positions."""
    q_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)
