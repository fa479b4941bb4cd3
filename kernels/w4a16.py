"""W4A16 GEMM: y = x @ dequant(qweight), for 4-bit weights and 16-bit (or fp32) activations.

The layout is the one in kernels/quant_reference.py: qweight int32 [N, K_pad // 8],
K-major in tiles of 128 input rows, nibble j of a tile's 16 int32s holding its rows
16j .. 16j + 15. So nibble j of one loaded [BLOCK_N, 16] tile is a slice of the
weight whose activations are 16 consecutive columns of x.

Decode batches (M <= DOT_MAX_M) run one kernel, bound by reading the weight:
- The weight is the dot's left operand ("swap AB"): out^T = W^T x^T. A plane of
  dequantized weights [BLOCK_N, 16] is made in registers and stays there (Hopper's
  wgmma takes its A operand from registers); the activations' 16 matching columns
  are the narrow right operand, loaded straight from memory. No dequantized weight
  goes through shared memory.
- Two weights cost two instructions: one lop3 ORs two nibbles into the mantissas
  of a 16-bit float pair (128 + q in bf16), one packed subtract takes 128 + zero off
  both; the group scale multiplies the tile's fp32 dot once (groups of whole tiles).
- Too few output tiles fill an H200's 132 SMs, so K is split across programs and
  one more small launch adds the fp32 partial sums (and the bias).
Larger batches (prefill) are bound by the tensor cores instead: the weight is
dequantized once into a 16-bit [N, K] buffer and cuBLAS multiplies; writing and
reading that buffer costs a few percent of such a GEMM.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.quant_reference import SYMMETRIC_ZERO, W4_TILE_K, W4_TILE_ROWS, w4_packed_width
from kernels.split_k import choose_split_k, multiprocessor_count, sum_splits

DOT_MAX_M = 64  # larger batches take the dequantize-then-cuBLAS path
PROGRAMS_PER_SM = 2  # split K until about this many programs per SM

# How weights become 16-bit floats (see _dequantize_pair); MAGIC is the float whose mantissa the nibble fills.
DEQUANT_PLAIN = tl.constexpr(0)
DEQUANT_FAST_BF16 = tl.constexpr(1)
DEQUANT_FAST_FP16 = tl.constexpr(2)
MAGIC = {DEQUANT_FAST_BF16.value: 128.0, DEQUANT_FAST_FP16.value: 1024.0}

# Where a weight's group scale is applied: once per 128-row tile (groups of whole tiles), once per
# 16-row nibble plane (groups of 16, 32, 64 ...), or per weight (act-order g_idx, other group sizes).
SCALE_PER_TILE = tl.constexpr(0)
SCALE_PER_PLANE = tl.constexpr(1)
SCALE_PER_WEIGHT = tl.constexpr(2)


@triton.jit
def _dequantize_pair(shifted, zero_lo, zero_hi, DEQUANT: tl.constexpr, MAGIC: tl.constexpr,
                     OUT_DTYPE: tl.constexpr):
    """Nibbles 0 and 4 of each int32 of `shifted` as (q - zero), exactly: planes j and j + 4.

    DEQUANT_FAST_*: one lop3 ORs two nibbles into the mantissas of a 16-bit float pair
    (MAGIC + q each), one packed subtract takes MAGIC + zero off both: two weights in two
    instructions, no integer-to-float conversion. DEQUANT_PLAIN does the same with
    Triton arithmetic (the interpreter, fp32).
    """
    if DEQUANT == DEQUANT_PLAIN:
        lo = ((shifted & 0xF).to(tl.float32) - zero_lo).to(OUT_DTYPE)
        hi = (((shifted >> 16) & 0xF).to(tl.float32) - zero_hi).to(OUT_DTYPE)
    else:
        lo16 = (zero_lo + MAGIC).to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        hi16 = (zero_hi + MAGIC).to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        zero_pair = lo16 | (hi16 << 16)
        if DEQUANT == DEQUANT_FAST_BF16:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000f000f, 0x43004300, 0xea; sub.rn.bf16x2 t, t, $3; "
                "mov.b32 {$0, $1}, t; }",
                "=h,=h,r,r", [shifted, zero_pair], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; lop3.b32 t, $2, 0x000f000f, 0x64006400, 0xea; sub.rn.f16x2 t, t, $3; "
                "mov.b32 {$0, $1}, t; }",
                "=h,=h,r,r", [shifted, zero_pair], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    return lo, hi


@triton.jit
def _group_row(ptr, group, offs_n, mask_n, valid, N):
    """Scales or zeros of one group for the tile's output rows, as an fp32 column [BLOCK_N, 1]."""
    return tl.load(ptr + group * N + offs_n, mask=mask_n & valid, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _x_plane(x_ptr, offs_m, mask_m, stride_xm, cols, K, EVEN: tl.constexpr):
    """Activation columns `cols` of the tile's rows, transposed: [16, BLOCK_M] (zeros past K)."""
    ptrs = x_ptr + offs_m[None, :] * stride_xm + cols[:, None]
    if EVEN:
        return tl.load(ptrs, mask=mask_m[None, :], other=0.0)
    return tl.load(ptrs, mask=mask_m[None, :] & (cols < K)[:, None], other=0.0)


@triton.jit
def _w4a16_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, packed_width, k_per_split,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SYM_ZERO: tl.constexpr, SCALES: tl.constexpr, TILE_K: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DEQUANT: tl.constexpr,
    MAGIC: tl.constexpr, EVEN: tl.constexpr,
):
    """out[split]^T [BLOCK_N, BLOCK_M] = sum over this program's K split of W^T tile @ x^T tile."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_m, mask_n = offs_m < M, offs_n < N
    out_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, TILE_K):
        w_ptrs = qweight_ptr + offs_n[:, None] * packed_width + (k0 // 8 + offs_r)[None, :]
        if EVEN:
            packed = tl.load(w_ptrs)
        else:
            packed = tl.load(w_ptrs, mask=mask_n[:, None], other=0)
        if SCALES == SCALE_PER_TILE:
            group = k0 // GROUP_SIZE
            scale = _group_row(scales_ptr, group, offs_n, mask_n, True, N)
            if HAS_ZEROS:
                zero = _group_row(zeros_ptr, group, offs_n, mask_n, True, N)
            else:
                zero = tl.full((BLOCK_N, 1), SYM_ZERO, tl.float32)
            tile = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(4):
            row_lo = k0 + ROWS * j  # first input row of plane j; plane j + 4 starts 4 * ROWS later
            row_hi = row_lo + 4 * ROWS
            x_lo = _x_plane(x_ptr, offs_m, mask_m, stride_xm, row_lo + offs_r, K, EVEN)
            x_hi = _x_plane(x_ptr, offs_m, mask_m, stride_xm, row_hi + offs_r, K, EVEN)
            shifted = packed >> (4 * j)
            if SCALES == SCALE_PER_TILE:
                w_lo, w_hi = _dequantize_pair(shifted, zero, zero, DEQUANT, MAGIC, out_dtype)
                tile = tl.dot(w_lo, x_lo, tile, input_precision=DOT_PRECISION)
                tile = tl.dot(w_hi, x_hi, tile, input_precision=DOT_PRECISION)
            elif SCALES == SCALE_PER_PLANE:  # each plane lies in one group; planes past K read no scale
                scale_lo = _group_row(scales_ptr, row_lo // GROUP_SIZE, offs_n, mask_n, row_lo < k_end, N)
                scale_hi = _group_row(scales_ptr, row_hi // GROUP_SIZE, offs_n, mask_n, row_hi < k_end, N)
                if HAS_ZEROS:
                    zero_lo = _group_row(zeros_ptr, row_lo // GROUP_SIZE, offs_n, mask_n, row_lo < k_end, N)
                    zero_hi = _group_row(zeros_ptr, row_hi // GROUP_SIZE, offs_n, mask_n, row_hi < k_end, N)
                else:
                    zero_lo = tl.full((BLOCK_N, 1), SYM_ZERO, tl.float32)
                    zero_hi = zero_lo
                w_lo, w_hi = _dequantize_pair(shifted, zero_lo, zero_hi, DEQUANT, MAGIC, out_dtype)
                acc += tl.dot(w_lo, x_lo, input_precision=DOT_PRECISION) * scale_lo
                acc += tl.dot(w_hi, x_hi, input_precision=DOT_PRECISION) * scale_hi
            else:  # every weight looks up its own group (act-order g_idx, or groups not a multiple of 16)
                for half in tl.static_range(2):
                    rows = row_lo + 4 * ROWS * half + offs_r
                    if HAS_G_IDX:
                        groups = tl.load(g_idx_ptr + rows, mask=rows < K, other=0)
                    else:
                        groups = rows // GROUP_SIZE
                    group_mask = mask_n[:, None] & (rows < K)[None, :]
                    meta = groups[None, :] * N + offs_n[:, None]
                    scale_w = tl.load(scales_ptr + meta, mask=group_mask, other=0.0).to(tl.float32)
                    if HAS_ZEROS:
                        zero_w = tl.load(zeros_ptr + meta, mask=group_mask, other=0.0).to(tl.float32)
                    else:
                        zero_w = SYM_ZERO
                    q = ((shifted >> (16 * half)) & 0xF).to(tl.float32)
                    w = ((q - zero_w) * scale_w).to(out_dtype)
                    acc = tl.dot(w, x_hi if half else x_lo, acc, input_precision=DOT_PRECISION)
        if SCALES == SCALE_PER_TILE:
            acc += tile * scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pid_k * M * N + offs_m[None, :] * N + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])


@triton.jit
def _dequantize_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, N, K, packed_width,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, SYM_ZERO: tl.constexpr,
    TILE_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One 128-row tile of BLOCK_N output rows of the weight, written as out [N, K] (nn.Linear's layout)."""
    pid_n, k0 = tl.program_id(0), tl.program_id(1) * TILE_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_n = offs_n < N
    packed = tl.load(qweight_ptr + offs_n[:, None] * packed_width + (k0 // 8 + offs_r)[None, :],
                     mask=mask_n[:, None], other=0)
    for plane in tl.static_range(8):
        rows = k0 + ROWS * plane + offs_r
        if HAS_G_IDX:
            groups = tl.load(g_idx_ptr + rows, mask=rows < K, other=0)
        else:
            groups = rows // GROUP_SIZE
        mask = mask_n[:, None] & (rows < K)[None, :]
        meta = groups[None, :] * N + offs_n[:, None]
        scale = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        else:
            zero = SYM_ZERO
        q = ((packed >> (4 * plane)) & 0xF).to(tl.float32)
        tl.store(out_ptr + offs_n[:, None] * K + rows[None, :], ((q - zero) * scale).to(out_ptr.dtype.element_ty),
                 mask=mask)


@dataclass(frozen=True)
class W4A16Config:
    """Tile sizes, warps and K splits of one launch of the decode kernel (benchmarks sweep these)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: choose from the shape (see choose_split_k)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def default_config(m: int) -> W4A16Config:
    """Tiles by batch size: the batch is the narrow side of the dot (16..64 columns)."""
    if _interpreted():
        return W4A16Config(block_m=16, block_n=32, num_warps=1, num_stages=1)
    return W4A16Config(block_m=max(16, triton.next_power_of_2(m)), block_n=64, num_warps=4, num_stages=4)


def _scale_mode(group_size: int, g_idx: torch.Tensor | None) -> int:
    if g_idx is None and group_size % W4_TILE_K == 0:
        return SCALE_PER_TILE.value
    if g_idx is None and group_size % W4_TILE_ROWS == 0:
        return SCALE_PER_PLANE.value
    return SCALE_PER_WEIGHT.value


def _dequant_mode(x: torch.Tensor, scales: int) -> int:
    """The inline-PTX dequantization on GPUs for 16-bit activations with tile or plane scales; plain otherwise."""
    if _interpreted() or scales == SCALE_PER_WEIGHT.value or x.dtype not in (torch.bfloat16, torch.float16):
        return DEQUANT_PLAIN.value
    return DEQUANT_FAST_BF16.value if x.dtype == torch.bfloat16 else DEQUANT_FAST_FP16.value


def _default_split_k(m: int, n: int, k: int, config: W4A16Config) -> int:
    """About PROGRAMS_PER_SM programs per SM (under the interpreter: two splits, to exercise the path)."""
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = triton.cdiv(k, W4_TILE_K)
    if _interpreted():
        return min(2, k_tiles)
    return choose_split_k(tiles, k_tiles, PROGRAMS_PER_SM * multiprocessor_count(torch.cuda.current_device()))


def dequantize_w4a16(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
    g_idx: torch.Tensor | None, k: int, dtype: torch.dtype, block_n: int = 64,
) -> torch.Tensor:
    """The weight as a dense [N, K] tensor of `dtype` (nn.Linear's layout), in one launch."""
    n = qweight.shape[0]
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    if n and k:
        _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, W4_TILE_K))](
            qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight, out,
            n, k, qweight.shape[1], GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None,
            SYM_ZERO=float(SYMMETRIC_ZERO), TILE_K=W4_TILE_K, ROWS=W4_TILE_ROWS, BLOCK_N=block_n,
            num_warps=1 if _interpreted() else 4)
    return out


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: W4A16Config | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) @ the W4A16 weight [K, N] -> [M, N] in x's dtype.

    With g_idx the group of each row is looked up (any order); otherwise rows
    k*G..(k+1)*G-1 form group k. Batches above DOT_MAX_M rows (without a config
    asking for the decode kernel) dequantize the weight and call cuBLAS.
    """
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] != w4_packed_width(k) or (g_idx is None and scales.shape[0] * group_size < k):
        raise ValueError(f"qweight {list(qweight.shape)} with {scales.shape[0]} groups of {group_size} "
                         f"does not pack K={k} input features")
    if not all(t is None or t.is_contiguous() for t in (qweight, scales, zeros, g_idx)):
        raise ValueError("W4A16 qweight, scales, zeros and g_idx must be contiguous")
    if m > DOT_MAX_M and config is None:
        weight = dequantize_w4a16(qweight, scales, zeros, group_size, g_idx, k, x.dtype)
        return F.linear(x, weight, bias)
    if x.stride(1) != 1:
        x = x.contiguous()
    config = config or default_config(m)
    scale_mode = _scale_mode(group_size, g_idx)
    dequant = _dequant_mode(x, scale_mode)
    split_k = config.split_k or _default_split_k(m, n, k, config)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), W4_TILE_K) * W4_TILE_K
    split_k = triton.cdiv(k, k_per_split)
    if split_k == 1:
        out = torch.empty(1, m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    if m:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split_k)
        _w4a16_kernel[grid](
            x, qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
            bias if bias is not None and split_k == 1 else scales, out,
            m, n, k, x.stride(0), qweight.shape[1], k_per_split,
            GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None,
            HAS_BIAS=bias is not None and split_k == 1, SYM_ZERO=float(SYMMETRIC_ZERO), SCALES=scale_mode,
            TILE_K=W4_TILE_K, ROWS=W4_TILE_ROWS, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", DEQUANT=dequant, MAGIC=MAGIC.get(dequant, 0.0),
            EVEN=k % W4_TILE_K == 0 and n % config.block_n == 0,  # no K / N masks: k_per_split is whole tiles
            # fp32 activations take twice the shared memory per pipeline stage
            num_warps=config.num_warps, num_stages=config.num_stages if x.element_size() <= 2 else min(config.num_stages, 2),
        )
    return out[0] if split_k == 1 else sum_splits(out, bias, x.dtype)
