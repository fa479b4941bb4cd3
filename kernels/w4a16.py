"""W4A16 GEMM: y = x @ dequant(qweight), for 4-bit weights and 16-bit (or fp32) activations.

The layout is the one in kernels/quant_reference.py (int32 [K // 8, N], groups
along K). Three paths, by the number of activation rows M:

- M = 1, 2 (decode of one or two sequences, what 4-bit checkpoints are bought
  for): a GEMV on the CUDA cores. Each packed int32 is read once, and its eight
  weights are dequantized in 16-bit pairs (lop3, packed subtract) once for all
  the rows, then multiplied by packed fmas, each row's pair sum widened to fp32
  once per int32. The packed rows stream through shared memory by asynchronous
  copies a few steps ahead of the arithmetic.
- M up to DOT_MAX_M: a tensor-core kernel that dequantizes tile by tile inside the
  matmul. Each program loads a packed [BLOCK_K // 8, BLOCK_N] tile and feeds its
  eight nibble planes to tl.dot; two weights are made by one lop3 and one packed
  subtract (the "magic number" trick: a nibble ORed into the mantissa of 128.0 in
  bf16 is 128 + q), and the group scale multiplies the tile's fp32 dot once.
- M > DOT_MAX_M (prefill, the largest decode batches): bound by the tensor cores,
  where dequantizing every tile costs more than it saves. The weight is
  dequantized into a 16-bit buffer a block of columns at a time
  (DEQUANT_CHUNK_BYTES, dropped after its GEMM) and cuBLAS multiplies; writing and
  reading that buffer is a few percent of such a GEMM.

Decode-sized GEMMs give too few output tiles to fill an H200's 132 SMs and are
bound by reading the weight, so the first two paths split K across programs
(split-K). The GEMV's last split of a tile adds the fp32 partial sums (and the
bias) in the same launch; the tensor-core kernel leaves that to one more small
launch, which measured faster for it (kernels/split_k.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous
from kernels.quant_reference import PACK_FACTOR, SYMMETRIC_ZERO
from kernels.split_k import plan_split_k, split_count, store_split_k

MIN_DOT = 16  # the smallest M / N / K tl.dot accepts
# Larger batches dequantize the weight and call cuBLAS. On the H200 that path took the four 8B GEMMs of a
# layer 333 us at M = 256 against the tensor-core kernel's 564, but 334 against 314 at M = 128
# (benchmarks/RESULTS.md).
DOT_MAX_M = 128
# The dense copy of a weight is made (and dropped) this much at a time: every Llama-3.1-8B weight in one
# piece (gate_up: 235 MB), the 70B shape's gate_up (940 MB) in four.
DEQUANT_CHUNK_BYTES = 256 << 20
PROGRAMS_PER_SM = 2  # split K until about this many programs per SM (4 measured no better on the H200)
MIN_BLOCK_K = PACK_FACTOR * MIN_DOT  # each of a K tile's eight nibble planes is one dot of K >= 16

# How weights become 16-bit floats (see _dequantize_pair).
DEQUANT_PLAIN = tl.constexpr(0)
DEQUANT_FAST_BF16 = tl.constexpr(1)
DEQUANT_FAST_FP16 = tl.constexpr(2)
# The fast modes' 16-bit format: its PTX name, its torch dtype, and MAGIC, the float whose low mantissa bits a
# nibble fills (one unit in the last place of MAGIC is 1.0, so MAGIC + q is exact).
FAST_FORMATS = {DEQUANT_FAST_BF16.value: ("bf16", torch.bfloat16, 128.0),
                DEQUANT_FAST_FP16.value: ("f16", torch.float16, 1024.0)}
MAGIC = {mode: magic for mode, (_, _, magic) in FAST_FORMATS.items()}


@triton.jit
def _dequantize_pair(shifted, zero, DEQUANT: tl.constexpr, MAGIC: tl.constexpr, OUT_DTYPE: tl.constexpr,
                     PTX: tl.constexpr):
    """Nibbles 0 and 4 of each int32 of `shifted` (rows j and j + 4 of its eight) as (q - zero), exactly.

    DEQUANT_FAST_*: one lop3 ORs two nibbles into the mantissas of a 16-bit float pair
    (MAGIC + q each), one packed subtract takes MAGIC + zero off both: two weights in two
    instructions, no integer-to-float conversion (PTX from PAIR_PTX). DEQUANT_PLAIN does
    the same with Triton arithmetic (the interpreter, fp32).
    """
    if DEQUANT == DEQUANT_PLAIN:
        lo = ((shifted & 0xF).to(tl.float32) - zero).to(OUT_DTYPE)
        hi = (((shifted >> 16) & 0xF).to(tl.float32) - zero).to(OUT_DTYPE)
    else:
        zero16 = (zero + MAGIC).to(OUT_DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo, hi = tl.inline_asm_elementwise(PTX, "=h,=h,r,r", [shifted, zero16 | (zero16 << 16)],
                                           dtype=(tl.int16, tl.int16), is_pure=True, pack=1)
        lo, hi = lo.to(OUT_DTYPE, bitcast=True), hi.to(OUT_DTYPE, bitcast=True)
    return lo, hi


@triton.jit
def _column_planes(x_tile, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """x_tile [BLOCK_M, 8 * ROWS] -> its eight planes [BLOCK_M, ROWS]: plane j holds columns 8r + j."""
    x_c0, x_c1 = tl.split(tl.reshape(x_tile, (BLOCK_M, ROWS, 2, 2, 2)))  # j = 4a + 2b + c; split c, then b, then a
    x_c0b0, x_c0b1 = tl.split(x_c0)
    x_c1b0, x_c1b1 = tl.split(x_c1)
    x0, x4 = tl.split(x_c0b0)
    x2, x6 = tl.split(x_c0b1)
    x1, x5 = tl.split(x_c1b0)
    x3, x7 = tl.split(x_c1b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _w4a16_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, partials_ptr, out_ptr, counters_ptr,
    M, N, K, stride_xm, k_per_split,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr,
    SYM_ZERO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCALE_PER_TILE: tl.constexpr, DEQUANT: tl.constexpr, MAGIC: tl.constexpr,
    EVEN: tl.constexpr, SPLIT_MODE: tl.constexpr, PTX: tl.constexpr, PDL: tl.constexpr,
):
    # Row 8r + j of a K tile is nibble j of packed row r. Instead of interleaving the eight
    # nibble planes into one [BLOCK_K, BLOCK_N] weight tile (a register shuffle), the tile is
    # eight dots: plane j [BLOCK_K // 8, BLOCK_N] against the activation columns 8r + j.
    wait_for_previous(PDL)
    ROWS: tl.constexpr = BLOCK_K // 8
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_m, mask_n = offs_m < M, offs_n < N
    out_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        packed_rows = k0 // 8 + offs_r
        if EVEN:
            packed = tl.load(qweight_ptr + packed_rows[:, None] * N + offs_n[None, :])
        else:
            packed = tl.load(qweight_ptr + packed_rows[:, None] * N + offs_n[None, :],
                             mask=(packed_rows[:, None] < k_end // 8) & mask_n[None, :], other=0)
        if SCALE_PER_TILE:  # the tile lies in one group: scale the tile's dot once, not every weight
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            else:
                zero = tl.full((1, BLOCK_N), SYM_ZERO, tl.float32)
            tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # One contiguous (pipelined) load of the activation tile, split into its eight column planes in registers.
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if EVEN:
            x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        else:
            x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                             mask=mask_m[:, None] & (offs_k < k_end)[None, :], other=0.0)
        x_planes = _column_planes(x_tile, BLOCK_M, ROWS)
        for j in tl.static_range(4):
            cols_lo = k0 + offs_r * 8 + j
            x_lo = x_planes[j]
            x_hi = x_planes[j + 4]
            if SCALE_PER_TILE:
                w_lo, w_hi = _dequantize_pair(packed >> (4 * j), zero, DEQUANT, MAGIC, out_dtype, PTX)
                tile = tl.dot(x_lo, w_lo, tile, input_precision=DOT_PRECISION)
                tile = tl.dot(x_hi, w_hi, tile, input_precision=DOT_PRECISION)
            else:  # groups smaller than the tile, or in any order (g_idx): scale every weight
                for half in tl.static_range(2):
                    cols = cols_lo + 4 * half
                    if HAS_G_IDX:
                        group_rows = tl.load(g_idx_ptr + cols, mask=cols < k_end, other=0)[:, None]
                    else:
                        group_rows = (cols // GROUP_SIZE)[:, None]
                    group_mask = (cols < k_end)[:, None] & mask_n[None, :]
                    scale_rows = tl.load(scales_ptr + group_rows * N + offs_n[None, :], mask=group_mask, other=0.0)
                    if HAS_ZEROS:
                        zero_rows = tl.load(zeros_ptr + group_rows * N + offs_n[None, :], mask=group_mask,
                                            other=0.0).to(tl.float32)
                    else:
                        zero_rows = SYM_ZERO
                    q = ((packed >> (4 * (j + 4 * half))) & 0xF).to(tl.float32)
                    w = ((q - zero_rows) * scale_rows.to(tl.float32)).to(out_dtype)
                    acc = tl.dot(x_hi if half else x_lo, w, acc, input_precision=DOT_PRECISION)
        if SCALE_PER_TILE:
            acc += tile * scale[None, :]
    store_split_k(acc, offs_m, offs_n, M, N, pid_k, tl.num_programs(2), pid_m * tl.num_programs(1) + pid_n,
                  partials_ptr, out_ptr, bias_ptr, counters_ptr, HAS_BIAS, SPLIT_MODE)


def _magic_pair(mode: int) -> str:
    """MAGIC's 16 bits in the fast mode's format, twice, as a PTX constant."""
    _, dtype, magic = FAST_FORMATS[mode]
    bits = torch.tensor(magic, dtype=dtype).view(torch.int16).item() & 0xFFFF
    return f"0x{bits:04x}{bits:04x}"


def _nibble_pair_ptx(mode: int, source: str, zero_pair: str) -> str:
    """PTX: nibbles 0 and 4 of the int32 `source` as (q - zero) in the 16-bit pair t (zero_pair: MAGIC + zero,
    twice): one lop3 into the mantissas of MAGIC, one packed subtract."""
    half = FAST_FORMATS[mode][0]
    return f"lop3.b32 t, {source}, 0x000f000f, {_magic_pair(mode)}, 0xea; sub.rn.{half}x2 t, t, {zero_pair}; "


def _pair_ptx(mode: int) -> str:
    """The PTX of _dequantize_pair: the pair t split into its two 16-bit halves."""
    return "{ .reg .b32 t; " + _nibble_pair_ptx(mode, "$2", "$3") + "mov.b32 {$0, $1}, t; }"


def _word_ptx(mode: int) -> str:
    """The PTX of _dequantize_word: the four nibble pairs (j, j + 4) of an int32, each as (q - zero) in a 16-bit
    pair, out of one lop3 and one packed subtract per pair."""
    steps = [_nibble_pair_ptx(mode, "$4", "$5") + "mov.b32 $0, t; "]
    steps += [f"shr.u32 p, $4, {4 * j}; {_nibble_pair_ptx(mode, 'p', '$5')}mov.b32 ${j}, t; " for j in (1, 2, 3)]
    return "{ .reg .b32 t, p; " + "".join(steps) + "}"


def _dot_pairs_ptx(mode: int) -> str:
    """The PTX of _dot_pairs: four weight pairs times their activation pairs, summed in a 16-bit pair, then fp32."""
    half = FAST_FORMATS[mode][0]
    return (f"{{ .reg .b32 acc; .reg .b16 lo, hi; .reg .f32 flo, fhi; mul.rn.{half}x2 acc, $1, $5; "
            f"fma.rn.{half}x2 acc, $2, $6, acc; fma.rn.{half}x2 acc, $3, $7, acc; fma.rn.{half}x2 acc, $4, $8, acc; "
            f"mov.b32 {{lo, hi}}, acc; cvt.f32.{half} flo, lo; cvt.f32.{half} fhi, hi; add.f32 $0, flo, fhi; }}")


PAIR_PTX = {mode: _pair_ptx(mode) for mode in FAST_FORMATS}
WORD_PTX = {mode: _word_ptx(mode) for mode in FAST_FORMATS}
DOT_PAIRS_PTX = {mode: _dot_pairs_ptx(mode) for mode in FAST_FORMATS}


@triton.jit
def _dequantize_word(packed, zero_pair, PTX: tl.constexpr):
    """Per int32 of `packed`: its eight weights (q_j - zero) as four 16-bit pairs (w_j, w_{j+4}), j = 0..3.

    Each pair is one lop3 (two nibbles into the mantissas of 128.0 / 1024.0) and one packed subtract of
    (MAGIC + zero) (PTX from WORD_PTX). The GEMV dequantizes a tile once for all its activation rows.
    """
    return tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r,r", [packed, zero_pair],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _dot_pairs(w0, w1, w2, w3, x0, x1, x2, x3, PTX: tl.constexpr):
    """The fp32 sum of w_j . x_j over four 16-bit pairs: packed fmas into a 16-bit pair, widened to fp32 once per
    int32 of weights (PTX from DOT_PAIRS_PTX)."""
    return tl.inline_asm_elementwise(PTX, "=f,r,r,r,r,r,r,r,r", [w0, w1, w2, w3, x0, x1, x2, x3],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _halves(a, b, HIGH: tl.constexpr, PRMT: tl.constexpr):
    """The low (or high) 16 bits of a and of b as one int32 (a's in the low half): one prmt on the GPU."""
    if PRMT:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, " + ("0x7632;" if HIGH else "0x5410;"), "=r,r,r",
                                         [a, b], dtype=tl.int32, is_pure=True, pack=1)
    if HIGH:
        return ((a >> 16) & 0xFFFF) | ((b >> 16) << 16)
    return (a & 0xFFFF) | (b << 16)


@triton.jit
def _x_pairs(x_words_ptr, row_words, word_cols, PRMT: tl.constexpr):
    """The activation pairs (x_j, x_{j+4}), j = 0..3, of each packed row, as four int32 [rows, packed rows] tensors.

    row_words: each activation row's offset in 32-bit words (masked-off rows pass a negative offset and read 0).
    One 16-byte load per packed row reads its eight 16-bit activations as four words
    (x0 x1) (x2 x3) (x4 x5) (x6 x7); one byte permute per pair regroups them.
    """
    offsets = row_words[:, None, None] + word_cols[None, :, None] + tl.arange(0, 4)[None, None, :]
    words = tl.load(x_words_ptr + offsets, mask=row_words[:, None, None] >= 0, other=0)
    even, odd = tl.split(tl.reshape(words, (words.shape[0], words.shape[1], 2, 2)))  # (w0, w2), (w1, w3)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return (_halves(w0, w2, False, PRMT), _halves(w0, w2, True, PRMT),
            _halves(w1, w3, False, PRMT), _halves(w1, w3, True, PRMT))


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, partials_ptr, out_ptr, counters_ptr, M, N, K, stride_xm,
    k_per_split,
    GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, SYM_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, DEQUANT: tl.constexpr, MAGIC: tl.constexpr,
    EVEN_N: tl.constexpr, WORD_PTX: tl.constexpr, DOT_PTX: tl.constexpr, LOAD_STAGES: tl.constexpr,
    SPLIT_MODE: tl.constexpr, PDL: tl.constexpr,
):
    """out[m, n] = sum over K of x[m, k] * W[k, n], on the CUDA cores; this program adds its K split.

    Each program takes BLOCK_M activation rows and ROWS packed rows (8 * ROWS input rows, inside one
    group) of BLOCK_N columns per step. It dequantizes that weight tile once and multiplies it into
    every one of its activation rows, keeping [BLOCK_M, ROWS, BLOCK_N] fp32 partial sums, reduced
    across ROWS once. With LOAD_STAGES > 1 the loop's loads go through shared memory by asynchronous
    copies, LOAD_STAGES - 1 steps ahead: more bytes in flight per SM without holding them in registers
    (loading ahead into registers measured slower on the H200: more registers, fewer warps).
    """
    wait_for_previous(PDL)
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    for k0 in tl.range(k_start, tl.minimum(k_start + k_per_split, K), 8 * ROWS, num_stages=LOAD_STAGES):
        w_ptrs = qweight_ptr + (k0 // 8 + offs_r)[:, None] * N + offs_n[None, :]
        if EVEN_N:
            packed = tl.load(w_ptrs)
        else:
            packed = tl.load(w_ptrs, mask=mask_n[None, :], other=0)
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            zero = tl.full((1, BLOCK_N), SYM_ZERO, tl.float32)
        cols = k0 + 8 * offs_r  # the first input row of each packed row
        if DEQUANT == DEQUANT_PLAIN:
            part = tl.zeros((BLOCK_M, ROWS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(8):
                x_j = tl.load(x_ptr + offs_m[:, None] * stride_xm + (cols + j)[None, :], mask=mask_m[:, None],
                              other=0.0).to(tl.float32)
                part += ((((packed >> (4 * j)) & 0xF).to(tl.float32) - zero)[None, :, :]) * x_j[:, :, None]
        else:
            zero16 = (zero + MAGIC).to(x_ptr.dtype.element_ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            w0, w1, w2, w3 = _dequantize_word(packed, zero16 | (zero16 << 16), WORD_PTX)
            row_words = tl.where(mask_m, offs_m * (stride_xm // 2), -1)
            x0, x1, x2, x3 = _x_pairs(x_ptr.to(tl.pointer_type(tl.int32)), row_words, cols // 2, True)
            part = _dot_pairs(w0[None, :, :], w1[None, :, :], w2[None, :, :], w3[None, :, :], x0[:, :, None],
                              x1[:, :, None], x2[:, :, None], x3[:, :, None], DOT_PTX)
        acc += part * scale[None, :, :]
    store_split_k(tl.sum(acc, axis=1), offs_m, offs_n, M, N, pid_k, tl.num_programs(1),
                  pid_m * tl.num_programs(0) + pid_n, partials_ptr, out_ptr, bias_ptr, counters_ptr, HAS_BIAS,
                  SPLIT_MODE)


@triton.jit
def _dequantize_kernel(qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, N, K, stride_row,
                       GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_G_IDX: tl.constexpr,
                       SYM_ZERO: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """ROWS packed rows (8 * ROWS input rows) x BLOCK_N columns of the weight, written to out [K, N].

    qweight, scales and zeros may be column slices of wider tensors (row stride stride_row).

    The eight input rows of one packed row share a group (groups are multiples of 8 rows), so
    scales and zeros are read once per packed row; with g_idx each weight looks its group up.
    """
    wait_for_previous(PDL)
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_r < K // 8)[:, None] & (offs_n < N)[None, :]
    packed = tl.load(qweight_ptr + offs_r[:, None] * stride_row + offs_n[None, :], mask=mask, other=0)
    if not HAS_G_IDX:
        meta = (offs_r * 8 // GROUP_SIZE)[:, None] * stride_row + offs_n[None, :]
        scale = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + meta, mask=mask, other=0.0).to(tl.float32) if HAS_ZEROS else SYM_ZERO
    for j in tl.static_range(8):
        rows = offs_r * 8 + j
        if HAS_G_IDX:
            meta = tl.load(g_idx_ptr + rows, mask=rows < K, other=0)[:, None] * stride_row + offs_n[None, :]
            scale = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + meta, mask=mask, other=0.0).to(tl.float32) if HAS_ZEROS else SYM_ZERO
        q = ((packed >> (4 * j)) & 0xF).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], ((q - zero) * scale).to(out_ptr.dtype.element_ty),
                 mask=mask)


def dequantize_w4a16(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
    g_idx: torch.Tensor | None, dtype: torch.dtype,
) -> torch.Tensor:
    """The W4A16 weight as a dense [K, N] tensor of `dtype`, in one launch.

    qweight, scales and zeros may be the same column slice of their tensors (rows contiguous).
    """
    k, n = qweight.shape[0] * PACK_FACTOR, qweight.shape[1]
    if not all(t is None or (t.stride(1) == 1 and t.stride(0) == qweight.stride(0)) for t in (qweight, scales, zeros)):
        raise ValueError("W4A16 qweight, scales and zeros must share one row stride, with contiguous rows")
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    rows, block_n = (16, 32) if interpreted() else (16, 128)
    if k and n:
        _dequantize_kernel[(triton.cdiv(k // PACK_FACTOR, rows), triton.cdiv(n, block_n))](
            qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight, out,
            n, k, qweight.stride(0), GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None,
            SYM_ZERO=float(SYMMETRIC_ZERO), ROWS=rows, BLOCK_N=block_n, num_warps=1 if interpreted() else 4,
            **launch_options(qweight.device))
    return out


@dataclass(frozen=True)
class W4A16Config:
    """Tile sizes, warps and K splits of one launch (benchmarks sweep these)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0  # 0: choose from the shape (see choose_split_k)
    # A second launch adds the K splits (see kernels/split_k.py): for this kernel the in-kernel sum measured
    # slower on the H200, 100 against 91 us for the 8B layer's four GEMMs at 16 rows.
    reduce_in_kernel: bool = False


@dataclass(frozen=True)
class W4A16GemvConfig:
    """Columns, packed rows per step, warps, load pipeline depth and K splits of one launch of the GEMV kernel."""

    # The defaults are the H200 sweep's best (benchmarks/RESULTS.md, seventh session): 61 us for the 8B layer's
    # four GEMMs, against 77 with 256 columns, four warps and loads into registers.
    block_n: int = 128
    rows: int = 16  # packed rows per step: 8 * rows input rows, which must lie in one group
    num_warps: int = 2
    num_stages: int = 3  # > 1: loads go through shared memory, num_stages - 1 steps ahead
    split_k: int = 0  # 0: choose from the shape (see choose_split_k)
    reduce_in_kernel: bool = True  # 59.6 against 63.1 us with a second launch
    block_m: int = 1  # activation rows per program, all multiplied by one dequantized weight tile


# The GEMV's tiles by activation rows, from the H200 sweeps (benchmarks/RESULTS.md, ninth session). Two rows share
# each dequantized tile: 69.6 us for the 8B layer's four GEMMs, against 86.1 for the tensor-core kernel. At four
# rows the tensor-core kernel is faster (86.2 against 97.7).
GEMV_CONFIGS = {1: W4A16GemvConfig(), 2: W4A16GemvConfig(block_n=64, rows=8, num_warps=1, split_k=8, block_m=2)}
DEFAULT_GEMV = GEMV_CONFIGS[1]


def default_config(m: int) -> W4A16Config:
    """Tiles by batch size (up to DOT_MAX_M rows): small batches are bound by reading the weight."""
    if interpreted():
        return W4A16Config(block_m=MIN_DOT, block_n=32, block_k=MIN_BLOCK_K, num_warps=1, num_stages=1)
    if m <= MIN_DOT:  # four K splits: 90 us for the 8B layer's four GEMMs at M = 16 against 98 chosen by shape
        return W4A16Config(block_m=MIN_DOT, block_n=64, block_k=128, num_warps=4, num_stages=3, split_k=4)
    if m <= 64:
        return W4A16Config(block_m=triton.next_power_of_2(m), block_n=64, block_k=128, num_warps=4, num_stages=4)
    return W4A16Config(block_m=128, block_n=128, block_k=128, num_warps=8, num_stages=3)


def _dequant_mode(x: torch.Tensor, scale_per_tile: bool) -> int:
    """The inline-PTX dequantization on GPUs for 16-bit activations with whole-tile groups; plain otherwise."""
    if interpreted() or not scale_per_tile or x.dtype not in (torch.bfloat16, torch.float16):
        return DEQUANT_PLAIN.value
    return DEQUANT_FAST_BF16.value if x.dtype == torch.bfloat16 else DEQUANT_FAST_FP16.value


def _w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None, config: W4A16GemvConfig) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[1]
    block_k = PACK_FACTOR * config.rows
    column_tiles, row_blocks = triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m)
    splits = split_count(column_tiles * row_blocks, triton.cdiv(k, block_k), config.split_k, PROGRAMS_PER_SM,
                         x.device)
    plan = plan_split_k(m, n, k, block_k, splits, row_blocks * column_tiles, x.dtype, x.device,
                        config.reduce_in_kernel)
    dequant = _dequant_mode(x, scale_per_tile=True)  # the GEMV's steps always lie in one group
    if m:
        _w4a16_gemv_kernel[(column_tiles, plan.splits, row_blocks)](
            x, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
            plan.partials, plan.out, plan.counters, m, n, k, x.stride(0), plan.k_per_split, GROUP_SIZE=group_size,
            HAS_ZEROS=zeros is not None, HAS_BIAS=plan.has_bias_in_kernel(bias), SYM_ZERO=float(SYMMETRIC_ZERO),
            BLOCK_M=config.block_m, ROWS=config.rows, BLOCK_N=config.block_n, DEQUANT=dequant,
            MAGIC=MAGIC.get(dequant, 0.0), EVEN_N=n % config.block_n == 0, WORD_PTX=WORD_PTX.get(dequant, ""),
            DOT_PTX=DOT_PAIRS_PTX.get(dequant, ""), LOAD_STAGES=config.num_stages,
            SPLIT_MODE=plan.mode, num_warps=config.num_warps, num_stages=config.num_stages,
            **launch_options(x.device))
    return plan.result(bias)


def _dequantized_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                        group_size: int, g_idx: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W for large batches: W dequantized and multiplied by cuBLAS DEQUANT_CHUNK_BYTES at a time
    (whole column blocks), so no full-size dense copy of a large weight exists even for a moment."""
    (m, k), n = x.shape, qweight.shape[1]
    columns = max(128, DEQUANT_CHUNK_BYTES // (k * x.element_size()) // 128 * 128)
    if columns >= n:
        weight = dequantize_w4a16(qweight, scales, zeros, group_size, g_idx, x.dtype)
        return torch.addmm(bias, x, weight) if bias is not None else x @ weight
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, columns):
        part = slice(start, start + columns)
        weight = dequantize_w4a16(qweight[:, part], scales[:, part], zeros[:, part] if zeros is not None else None,
                                  group_size, g_idx, x.dtype)
        out[:, part] = torch.addmm(bias[part], x, weight) if bias is not None else x @ weight
    return out


def _gemv_fits(x: torch.Tensor, group_size: int, g_idx: torch.Tensor | None, config: W4A16GemvConfig) -> bool:
    """The GEMV needs whole groups per step (no g_idx), whole steps per K, and rows it can read as
    32-bit words (pairs of 16-bit activations)."""
    block_k = PACK_FACTOR * config.rows
    return (g_idx is None and group_size % block_k == 0 and x.shape[1] % block_k == 0
            and x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0)


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: W4A16Config | W4A16GemvConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (fp16 / bf16 / fp32) @ the W4A16 weight [K, N] -> [M, N] in x's dtype.

    With g_idx the group of each row is looked up (any order); otherwise rows
    k*G..(k+1)*G-1 form group k. Groups that are a multiple of the K tile (128, per
    channel) take the fast path: one scale per tile, weights dequantized two per instruction.
    Batches of GEMV_CONFIGS' sizes take the GEMV where its groups fit; batches above DOT_MAX_M rows
    dequantize and call cuBLAS. A config picks one kernel and its tiles instead.
    """
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * PACK_FACTOR != k:
        raise ValueError(f"qweight {list(qweight.shape)} does not pack K={k} input features")
    if not all(t is None or t.is_contiguous() for t in (qweight, scales, zeros, g_idx)):
        raise ValueError("W4A16 qweight, scales, zeros and g_idx must be contiguous")
    if x.stride(1) != 1:
        x = x.contiguous()
    if isinstance(config, W4A16GemvConfig):
        if not _gemv_fits(x, group_size, g_idx, config):
            raise ValueError(f"the W4A16 GEMV cannot run {config} here: it needs 8 * rows to divide the group "
                             f"size ({group_size}) and K ({k}), no g_idx, and 4-byte aligned activation rows")
        return _w4a16_gemv(x, qweight, scales, zeros, group_size, bias, config)
    if config is None and m in GEMV_CONFIGS and _gemv_fits(x, group_size, g_idx, GEMV_CONFIGS[m]):
        return _w4a16_gemv(x, qweight, scales, zeros, group_size, bias, GEMV_CONFIGS[m])
    if m > DOT_MAX_M and config is None:
        return _dequantized_matmul(x, qweight, scales, zeros, group_size, g_idx, bias)
    config = config if isinstance(config, W4A16Config) else default_config(m)
    if config.block_k < MIN_BLOCK_K or config.block_k & (config.block_k - 1):
        raise ValueError(f"W4A16 block_k must be a power of two >= {MIN_BLOCK_K}, not {config.block_k}")
    scale_per_tile = g_idx is None and group_size % config.block_k == 0
    dequant = _dequant_mode(x, scale_per_tile)
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    splits = split_count(tiles, triton.cdiv(k, config.block_k), config.split_k, PROGRAMS_PER_SM, x.device)
    plan = plan_split_k(m, n, k, config.block_k, splits, tiles, x.dtype, x.device, config.reduce_in_kernel)
    if m:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), plan.splits)
        _w4a16_kernel[grid](
            x, qweight, scales, zeros if zeros is not None else scales, g_idx if g_idx is not None else qweight,
            bias if bias is not None else scales, plan.partials, plan.out, plan.counters,
            m, n, k, x.stride(0), plan.k_per_split,
            GROUP_SIZE=group_size, HAS_ZEROS=zeros is not None, HAS_G_IDX=g_idx is not None,
            HAS_BIAS=plan.has_bias_in_kernel(bias), SYM_ZERO=float(SYMMETRIC_ZERO),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            SCALE_PER_TILE=scale_per_tile, DEQUANT=dequant, MAGIC=MAGIC.get(dequant, 0.0),
            EVEN=k % config.block_k == 0 and n % config.block_n == 0,  # no K / N masks: k_per_split is whole tiles
            SPLIT_MODE=plan.mode, PTX=PAIR_PTX.get(dequant, ""),
            # fp32 activations (and their per-row scales) take 4x the shared memory per pipeline stage
            num_warps=config.num_warps, num_stages=config.num_stages if x.element_size() <= 2 else min(config.num_stages, 2),
            **launch_options(x.device),
        )
    return plan.result(bias)
