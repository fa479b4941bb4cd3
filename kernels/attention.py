"""Triton paged attention: decode (split-K, GQA-grouped) and varlen prefill.

Both kernels read K/V through block tables from the cache layout
[num_blocks, block_size, num_kv_heads, head_dim] and match the torch
reference in kernels/reference.py (same arguments plus optional launch
hints, same semantics).

What makes them fast on Hopper:
- GQA grouping: one program serves every query head of a KV head, so each K/V
  tile is read from HBM once per KV head, not once per query head. The group's
  query rows are padded to 16, the smallest tl.dot M, so QK^T and PV run on the
  tensor cores.
- A KV tile spans several cache blocks (BLOCK_N tokens gathered through the
  block table), so the loop does few, wide iterations whatever the block size.
- Softmax in base 2: log2(e) is folded into the scale once, exp2 is one
  instruction. Accumulation is fp32; inputs and outputs stay in the cache dtype.
- Sliding-window layers read only the window: decode starts at
  seq_len - window, prefill tiles start at their first query's window.
- Decode splits each sequence's context over NUM_SPLITS programs when there
  are too few (sequence, KV head) pairs to fill the 132 SMs (flash-decoding),
  then a small kernel merges the partial results by their log-sum-exp. The
  split of a sequence is computed on the device from its length, so the launch
  depends on shapes only and is safe inside a CUDA graph.
- Prefill runs one flat grid of query tiles over the whole batch (at most
  T // BLOCK_Q + B of them); each program finds its sequence by a binary search
  over query_start_loc. The grid depends on shapes only, not on the longest
  query, so mixed steps replay from CUDA graphs too, and a step of 256 decode
  rows and one long chunk launches a few hundred programs per KV head rather
  than (longest chunk / BLOCK_Q) x 256 mostly idle ones.
- An FP8 cache (float8_e4m3fn, --kv-cache-dtype fp8) is read as one byte per
  element and converted to the query's dtype in registers (exactly: every e4m3
  value is a bf16/fp16 value); the per-layer scales are not multiplied into
  each tile but folded into the score scale (k_scale) and the final
  normalisation (v_scale), which is the same sum in exact arithmetic. They
  are read from device memory, so CUDA graphs replay with the loaded values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.cache import kv_scales
from kernels.gpu import multiprocessor_count
from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous
from kernels.reference import FP8_DTYPE

LOG2E = 1.4426950408889634
MIN_DOT_M = 16  # the smallest M tl.dot accepts


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_row_ptr, positions, valid, cache_head_offset,
                  stride_cache_block, stride_cache_slot, offs_d, PAGE_SIZE: tl.constexpr):
    """The [BLOCK_N, HEAD_DIM] K and V tiles of `positions`, gathered through the block table."""
    page = tl.load(block_table_row_ptr + positions // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    row = page * stride_cache_block + (positions % PAGE_SIZE) * stride_cache_slot + cache_head_offset
    offs = row[:, None] + offs_d[None, :]
    k = tl.load(k_cache_ptr + offs, mask=valid[:, None], other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=valid[:, None], other=0.0)
    return k, v


@triton.jit
def _query_operand(q, FP8: tl.constexpr):
    """The query as the dots take it: with an FP8 cache and bf16 queries the dots run in fp16 (clamped to
    its range), because e4m3 widens to fp16 in one packed instruction per two values, and to bf16 only
    through fp16 with one more conversion per value (PTX of sm_90): the K/V conversions of every tile
    cost more than the dots. e4m3 values are exact in fp16."""
    if FP8 and q.dtype == tl.bfloat16:
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
    return q


@triton.jit
def _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """Fold one tile of base-2 scores and its V rows into the running (max, sum, output).

    A row masked out of every tile so far (a sliding window that starts past
    the tile) keeps max -inf; it is measured against 0 so it adds nothing instead of NaN.
    """
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, window,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g
    head_valid = offs_g < GROUP

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_valid[:, None], other=0.0)

    # This split's share of the attended context (the last `window` positions, or all when window is 0),
    # in whole tiles, from the device-side length.
    seq_len = tl.load(seq_lens_ptr + seq)
    span_start = tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len - span_start, BLOCK_N), NUM_SPLITS)
    start = span_start + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    block_table_row = block_tables_ptr + seq * stride_bt
    cache_head_offset = kv_head * stride_cache_head
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    q = _query_operand(q, FP8)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + offs_n
        valid = positions < end
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_row, positions, valid, cache_head_offset,
                             stride_cache_block, stride_cache_slot, offs_d, PAGE_SIZE)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless the cache is FP8 (see _query_operand)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION)

    # An empty split (short sequence) has l_i == 0 and acc == 0: it writes zeros
    # with a log-sum-exp of -inf, which the merge weighs as nothing.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if FP8:
        out = out * tl.load(v_scale_ptr)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_valid[:, None])
    else:
        row = (seq * num_heads + heads) * NUM_SPLITS + split  # [B, num_heads, NUM_SPLITS]
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out,
                 mask=head_valid[:, None])
        tl.store(partial_lse_ptr + row, m_i + tl.log2(tl.maximum(l_i, 1e-30)), mask=head_valid)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_previous(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq * tl.num_programs(1) + head
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    split_valid = offs_s < NUM_SPLITS
    lse = tl.load(partial_lse_ptr + row * NUM_SPLITS + offs_s, mask=split_valid, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    # Only an empty sequence (a padded CUDA-graph slot) has no finite lse: it gets zeros.
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    partial = tl.load(partial_out_ptr + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                      mask=split_valid[:, None], other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _sequence_of_tile(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns flat query tile `tile`.

    Sequence s owns the tiles from query_start_loc[s] // BLOCK_Q + s on: at least
    cdiv(q_len, BLOCK_Q) of them, and that start grows with s, so a binary search
    finds the last sequence starting at or before `tile`. Sequences with no
    queries (CUDA-graph padding) own tiles too; their programs return at once.
    """
    lo = tile * 0
    hi = tile * 0 + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_seqs"])  # one compiled kernel whatever the batch size
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale, window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_slot, stride_cache_head, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SLIDING: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    """One program: BLOCK_Q query tokens of one sequence x all GROUP heads of one KV head.

    The tile's rows are (token, head-in-group) pairs, BLOCK_Q * GROUP of them
    padded to BLOCK_M (a power of two), so K/V tiles are shared by the whole
    group and decode rows (one token) in a mixed batch still fill the
    tensor-core M dimension with useful heads.
    """
    wait_for_previous(PDL)
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _sequence_of_tile(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)

    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    q_tile = tile - (q_begin // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    token = q_tile * BLOCK_Q + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (token < q_len)
    q_offs = (q_begin + token)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None], other=0.0)
    q_pos = context_len + token  # every row sees position 0, so no row is all -inf

    # Causal: this tile's last query sits at context_len + min(q_len, (q_tile+1)*BLOCK_Q) - 1.
    kv_end = context_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    # Tiles wholly before the tile's first query need no causal mask.
    unmasked_end = (context_len + q_tile * BLOCK_Q) // BLOCK_N * BLOCK_N
    # A sliding window starts at the tile's first query's window (later queries mask more); positions
    # before it are never loaded: their blocks may already belong to another sequence.
    kv_lo = 0
    if SLIDING:
        kv_lo = tl.maximum(context_len + q_tile * BLOCK_Q - window + 1, 0)
    kv_start = kv_lo // BLOCK_N * BLOCK_N

    block_table_row = block_tables_ptr + seq * stride_bt
    cache_head_offset = kv_head * stride_cache_head
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    q = _query_operand(q, FP8)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for tile_start in range(kv_start, kv_end, BLOCK_N):
        positions = tile_start + offs_n
        valid = (positions >= kv_lo) & (positions < kv_end)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_table_row, positions, valid, cache_head_offset,
                             stride_cache_block, stride_cache_slot, offs_d, PAGE_SIZE)
        k, v = k.to(q.dtype), v.to(q.dtype)  # a no-op unless the cache is FP8 (see _query_operand)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if SLIDING:
            attended = (positions[None, :] <= q_pos[:, None]) & (positions[None, :] > q_pos[:, None] - window)
            scores = tl.where(attended, scores, float("-inf"))
        elif tile_start >= unmasked_end:
            causal = positions[None, :] <= q_pos[:, None]
            scores = tl.where(causal, scores, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l_i is 0 only in padding rows, never stored
    if FP8:
        out = out * tl.load(v_scale_ptr)
    o_offs = (q_begin + token)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and warps of one kernel launch (benchmarks sweep these)."""

    block_n: int
    num_warps: int
    num_stages: int
    block_q: int = 0  # prefill only: query tokens per program
    num_splits: int = 0  # decode only: 0 = choose from the batch shape


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models (CPU-parity tests on a GPU) must not silently drop to tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_layout(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError("paged attention needs the head dimension contiguous")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share one layout")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads do not divide into {k_cache.shape[2]} KV heads")


def default_decode_config(head_dim: int, fp8_cache: bool = False) -> LaunchConfig:
    """Tiles of the decode kernel. An FP8 cache takes two warps: on the H200 the 8B shape at batch 256 and
    2,048 tokens took 341 us against 551 with four (benchmarks.attention_kernels --kv-cache-dtype fp8 --sweep)."""
    if interpreted():
        return LaunchConfig(block_n=16, num_warps=1, num_stages=1)
    return LaunchConfig(block_n=64 if head_dim <= 128 else 32, num_warps=2 if fp8_cache else 4, num_stages=2)


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int) -> int:
    """Enough splits to give every SM about two programs, never more than the context has tiles."""
    if interpreted():
        target_programs = 2 * batch * num_kv_heads  # exercise the merge path in tests
    else:
        target_programs = 2 * multiprocessor_count(torch.cuda.current_device())
    wanted = math.ceil(target_programs / (batch * num_kv_heads))
    return max(1, min(wanted, math.ceil(max_context / block_n), 32))


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, head_dim], one query token per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    config: LaunchConfig | None = None,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # one float32 each; used when the cache is FP8 (None: 1.0)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-token decode over the paged cache, split over the context when the batch is small.

    The split count depends only on shapes (batch, heads, block-table width),
    never on the lengths' values, so the launch replays correctly in a CUDA graph.
    """
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    _check_layout(q, k_cache, v_cache)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    fp8 = k_cache.dtype == FP8_DTYPE
    config = config or default_decode_config(head_dim, fp8)
    group = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * page_size
    num_splits = config.num_splits or choose_num_splits(
        batch, num_kv_heads, min(max_context, sliding_window or max_context), config.block_n)
    if num_splits > 1:
        partial_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out  # unused
    k_scale, v_scale = kv_scales(k_scale, v_scale, fp8, q)
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, partial_out, partial_lse, k_scale, v_scale,
        scale * LOG2E, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(MIN_DOT_M, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        PAGE_SIZE=page_size, BLOCK_N=config.block_n, NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(q.dtype), FP8=fp8,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(q.device),
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_heads)](
            partial_out, partial_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=1 if interpreted() else 2, **launch_options(q.device),
        )
    return out


def default_prefill_config(head_dim: int, group: int) -> LaunchConfig:
    """About 64 (token, head) rows per program on the GPU, 16 under the interpreter."""
    block_q = max(1, (MIN_DOT_M if interpreted() else 64) // group)
    if interpreted():
        return LaunchConfig(block_n=16, num_warps=1, num_stages=1, block_q=block_q)
    return LaunchConfig(block_n=64, num_warps=4, num_stages=2, block_q=block_q)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim], queries of B sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including this step's tokens
    scale: float,
    config: LaunchConfig | None = None,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention over the paged cache (prefill, chunked prefill, prefix hits, mixed).

    The launch depends on shapes only (no host sync, safe in a CUDA graph).
    CUDA-graph padding is allowed: a sequence of length 0 reads no K/V and gets
    zero output rows, however many queries it has; a sequence with no queries
    costs a program that returns at once. The step's K/V must already be in the cache.
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    _check_layout(q, k_cache, v_cache)
    out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    group = num_heads // num_kv_heads
    config = config or default_prefill_config(head_dim, group)
    # Every sequence's tiles fit (see _sequence_of_tile): sum of cdiv(q_len, block_q) <= T // block_q + B.
    grid = (num_tokens // config.block_q + batch, num_kv_heads)
    fp8 = k_cache.dtype == FP8_DTYPE
    k_scale, v_scale = kv_scales(k_scale, v_scale, fp8, q)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, k_scale, v_scale,
        scale * LOG2E, sliding_window or 0, batch,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_Q=config.block_q, BLOCK_M=max(MIN_DOT_M, triton.next_power_of_2(config.block_q * group)),
        BLOCK_N=config.block_n, DOT_PRECISION=_dot_precision(q.dtype), SLIDING=sliding_window is not None,
        FP8=fp8,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(q.device),
    )
    return out
