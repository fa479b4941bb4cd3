"""FP8 (e4m3) GEMM with activations quantized per token at run time.

y = (x_q * x_scale) @ (w_q * w_scale)^T, x_scale per token (or one static
scale), w_scale per output channel (kernels/quant_reference.py has the layout).

fp8_linear is what a layer calls: per-token quantization (one program per row,
the row read once into registers, the hardware's rounding cast), then the GEMM;
one 16-bit row (batch-1 decode) instead takes the weight-only GEMV of
kernels/fp8_gemv.py, unquantized. fp8_static_linear is the same for a
checkpoint's static input scale.
Decode batches (up to TRITON_MAX_M rows) take a Triton kernel: the weight tile
is the left operand of an FP8 wgmma (K-major, 16-byte loads), the activation
the narrow right one, and long K is split across programs so that reading the
weight is the cost. Larger batches (TRITON_MAX_M* say where the Triton kernel
stopped winning) run torch._scaled_mm (cuBLASLt, row-wise scales) on GPUs with
FP8 tensor cores (compute capability 8.9+) when its shape and dtype rules hold;
otherwise, and under the Triton interpreter, the Triton kernel computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fp8_gemv import GEMV_MAX_M, fp8_weight_only_gemv
from kernels.gpu import capability, device_index
from kernels.interpreter import interpreted
from kernels.pdl import launch_options, wait_for_previous
from kernels.quant_reference import FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, quantize_fp8_static
from kernels.split_k import plan_split_k, store_split_k

SCALED_MM_ALIGNMENT = 16  # cuBLASLt FP8: K and N multiples of 16
MIN_DOT = 16
# The Triton GEMM takes batches up to TRITON_MAX_M rows, and up to TRITON_MAX_M_NARROW rows when N is at
# most TRITON_NARROW_N; cuBLASLt's was faster beyond (H200 measurements, benchmarks/RESULTS.md).
TRITON_MAX_M = 64
# Default K per split: on the H200 one split was fastest at K = 4096 (even with fewer output tiles than
# SMs) and two at K = 14336 (Llama-3.1-8B down_proj); more splits only added partial-sum traffic.
K_PER_SPLIT = 7168
TRITON_MAX_M_NARROW = 256
TRITON_NARROW_N = 4096
MAX_ROW_BLOCK = 16384  # per-token quantizers read rows up to this long once (registers), longer ones twice


@triton.jit
def _round_to_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, still float32.

    Rounding here makes the final cast exact, so it cannot depend on how the
    cast rounds: Triton's interpreter truncates carries (124.3 -> 64 instead of 128).
    Ties go to even, as torch's cast does (half-precision inputs tie often).
    """
    magnitude = tl.abs(v)
    exponent = tl.maximum(tl.floor(tl.log2(tl.maximum(magnitude, 1e-30))), -6.0)  # e4m3 subnormals below 2^-6
    ulp = tl.exp2(exponent - 3.0)  # 3 mantissa bits
    steps = magnitude / ulp  # exact: ulp is a power of two
    nearest = tl.floor(steps + 0.5)
    odd = nearest - 2.0 * tl.floor(nearest * 0.5) == 1.0
    nearest = tl.where((nearest - steps == 0.5) & odd, nearest - 1.0, nearest)
    rounded = nearest * ulp
    return tl.where(v < 0, -rounded, rounded)


@triton.jit
def _to_e4m3(v, EXACT_ROUNDING: tl.constexpr):
    """float32 v (already clamped to +-448) as e4m3: the hardware's round-to-nearest-even cast on the GPU."""
    if EXACT_ROUNDING:
        v = _round_to_e4m3(v)
    return v.to(tl.float8e4nv)


_E4M3_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(FP8_MIN_SCALE)


@triton.jit
def e4m3_row_scale(amax):
    """A row's per-token scale from its max |x|: amax / 448, floored as vLLM does so zero rows stay finite."""
    return tl.maximum(amax / _E4M3_MAX, _MIN_SCALE)


@triton.jit
def scaled_to_e4m3(x, scale, EXACT_ROUNDING: tl.constexpr):
    """float32 x / scale, clamped to +-448, as e4m3."""
    return _to_e4m3(tl.clamp(x / scale, -_E4M3_MAX, _E4M3_MAX), EXACT_ROUNDING)


@triton.jit
def row_to_e4m3(x, EXACT_ROUNDING: tl.constexpr):
    """A whole row held in registers (float32, masked lanes 0) -> (its e4m3 values, its float32 scale)."""
    scale = e4m3_row_scale(tl.max(tl.abs(x), axis=0))
    return scaled_to_e4m3(x, scale, EXACT_ROUNDING), scale


@triton.jit
def chunked_row_to_e4m3(src_ptr, K, out_ptr, scale_ptr, BLOCK: tl.constexpr, EXACT_ROUNDING: tl.constexpr,
                        LOAD: tl.constexpr):
    """Quantize one row of K values that LOAD(src_ptr, offsets, K) produces (float32, 0 past K).

    When the row fits in one BLOCK it is produced once and kept in registers; a
    longer row is produced twice (amax, then the scaled cast), BLOCK at a time.
    Writes the K e4m3 values at out_ptr and the row's scale at scale_ptr.
    """
    offs = tl.arange(0, BLOCK)
    x = LOAD(src_ptr, offs, K)
    amax = tl.abs(x)
    for start in range(BLOCK, K, BLOCK):
        amax = tl.maximum(amax, tl.abs(LOAD(src_ptr, start + offs, K)))
    scale = e4m3_row_scale(tl.max(amax, axis=0))
    tl.store(scale_ptr, scale)
    for start in range(0, K, BLOCK):
        if start > 0:
            x = LOAD(src_ptr, start + offs, K)
        tl.store(out_ptr + start + offs, scaled_to_e4m3(x, scale, EXACT_ROUNDING), mask=start + offs < K)


@triton.jit
def _load_float32(x_ptr, offs, K):
    return tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)


@triton.jit
def _quantize_per_token_kernel(x_ptr, out_ptr, scale_ptr, stride_x, K, EXACT_ROUNDING: tl.constexpr,
                               BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One row per program: max |x| / 448 is the row's scale (vLLM's floor keeps zero rows finite)."""
    wait_for_previous(PDL)
    row = tl.program_id(0)
    chunked_row_to_e4m3(x_ptr + row * stride_x, K, out_ptr + row * K, scale_ptr + row, BLOCK, EXACT_ROUNDING,
                        _load_float32)


def row_block_and_warps(k: int) -> tuple[int, int]:
    """BLOCK and num_warps of a one-program-per-row quantizer over rows of k values (small under the interpreter)."""
    block = min(64 if interpreted() else MAX_ROW_BLOCK, triton.next_power_of_2(k))
    return block, 1 if interpreted() else max(4, min(16, block // 1024))


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3 [M, K], float32 scale [M, 1]); see quant_reference.quantize_fp8_per_token."""
    m, k = x.shape
    out = torch.empty(m, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block, num_warps = row_block_and_warps(k)
        _quantize_per_token_kernel[(m,)](x, out, scale, x.stride(0), k, EXACT_ROUNDING=interpreted(), BLOCK=block,
                                         num_warps=num_warps, **launch_options(x.device))
    return out, scale


@triton.jit
def _fp8_matmul_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, partials_ptr, out_ptr, counters_ptr, M, N, K, stride_am,
    k_per_split, A_SCALE_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_MODE: tl.constexpr, PDL: tl.constexpr,
):
    """out[split] = (a_q * a_scale) @ (b * b_scale)^T over this program's K split."""
    wait_for_previous(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    if A_SCALE_PER_ROW:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    else:
        a_scale = tl.load(a_scale_ptr + tl.zeros((BLOCK_M,), dtype=tl.int32))
    # The weight tile is the dot's left operand, [BLOCK_N, BLOCK_K] as stored (K contiguous: wide loads,
    # and Hopper's FP8 wgmma wants both operands K-major); the activation tile is the narrow right one.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[:, None] * K + offs_k[None, :]
        if EVEN:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k < k_end)[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[:, None] & (offs_k < k_end)[None, :], other=0.0)
        if UPCAST:  # the interpreter and pre-Ada GPUs have no FP8 dot
            acc += tl.dot(b.to(tl.float32), tl.trans(a.to(tl.float32)), input_precision="ieee")
        else:
            acc = tl.dot(b, tl.trans(a), acc)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=mask_n, other=0.0)
    acc = tl.trans(acc) * a_scale[:, None] * b_scale[None, :]
    store_split_k(acc, offs_m, offs_n, M, N, pid_k, tl.num_programs(2), pid_m * tl.num_programs(1) + pid_n,
                  partials_ptr, out_ptr, bias_ptr, counters_ptr, HAS_BIAS, SPLIT_MODE)


@dataclass(frozen=True)
class Fp8Config:
    """Tiles, warps and K splits of one Triton FP8 launch (benchmarks sweep these)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    split_k: int = 0  # 0: about K_PER_SPLIT of K per split
    reduce_in_kernel: bool = True  # the last K split adds the partials (else a second launch; see kernels/split_k.py)


def default_config(m: int) -> Fp8Config:
    """Tiles by batch size, from the H200 sweep in benchmarks/quant_gpu.py."""
    if interpreted():
        return Fp8Config(block_m=MIN_DOT, block_n=32, block_k=32, num_warps=1, num_stages=1)
    if m <= 16:
        return Fp8Config(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
    if m <= 64:
        return Fp8Config(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=4)
    return Fp8Config(block_m=128, block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=1)


def _triton_fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       out_dtype: torch.dtype, bias: torch.Tensor | None, config: Fp8Config | None) -> torch.Tensor:
    """The Triton path: split-K for long K, where the few output tiles of a decode batch leave SMs idle."""
    m, k = a.shape
    n = weight.shape[0]
    config = config or default_config(m)
    under_interpreter = interpreted()
    k_tiles = triton.cdiv(k, config.block_k)
    if config.split_k:
        split_k = config.split_k
    elif under_interpreter:
        split_k = min(2, k_tiles)
    else:
        split_k = max(1, min(round(k / K_PER_SPLIT), k_tiles))
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    plan = plan_split_k(m, n, k, config.block_k, split_k, tiles, out_dtype, a.device, config.reduce_in_kernel)
    if m:
        weight_scale = weight_scale.float().contiguous()
        _fp8_matmul_kernel[(triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), plan.splits)](
            a if a.stride(1) == 1 else a.contiguous(), a_scale.float().contiguous(), weight.contiguous(), weight_scale,
            bias if bias is not None else weight_scale, plan.partials, plan.out, plan.counters,
            m, n, k, a.stride(0) if a.stride(1) == 1 else k, plan.k_per_split,
            A_SCALE_PER_ROW=a_scale.numel() != 1, HAS_BIAS=plan.has_bias_in_kernel(bias),
            UPCAST=under_interpreter or not _has_fp8_tensor_cores(a.device),
            EVEN=k % config.block_k == 0 and n % config.block_n == 0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_MODE=plan.mode,
            num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(a.device),
        )
    return plan.result(bias)


def _has_fp8_tensor_cores(device: torch.device) -> bool:
    return device.type == "cuda" and capability(device_index(device)) >= (8, 9)


def _scaled_mm_fits(x_q: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """cuBLASLt's FP8 rules: FP8 tensor cores, K and N multiples of 16, row-wise scales need bf16 output."""
    n, k = weight.shape
    return (
        _has_fp8_tensor_cores(x_q.device)
        and not interpreted()
        and k % SCALED_MM_ALIGNMENT == 0
        and n % SCALED_MM_ALIGNMENT == 0
        and out_dtype == torch.bfloat16
    )


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    config: Fp8Config | None = None,
) -> torch.Tensor:
    """x_q [M, K] fp8, x_scale float32 [M, 1] (or one value), weight fp8 [N, K], weight_scale float32 [N] -> [M, N]."""
    m, k = x_q.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"FP8 weight {list(weight.shape)} does not match K={k}")
    triton_faster = m <= TRITON_MAX_M or (m <= TRITON_MAX_M_NARROW and n <= TRITON_NARROW_N)
    if config is None and not triton_faster and _scaled_mm_fits(x_q, weight, out_dtype):
        y = torch._scaled_mm(
            x_q, weight.t(), scale_a=x_scale.float().reshape(-1, 1).expand(m, 1).contiguous(),
            scale_b=weight_scale.float().reshape(1, n), out_dtype=out_dtype,
        )
        return y if bias is None else y.add_(bias)
    return _triton_fp8_matmul(x_q, x_scale, weight, weight_scale, out_dtype, bias, config)


def fp8_quantizes_activations(rows: int, dtype: torch.dtype) -> bool:
    """Whether fp8_linear quantizes an activation of `rows` rows: one 16-bit row (batch-1 decode) is
    multiplied unquantized by the weight-only GEMV (kernels/fp8_gemv.py), so a layer producing the
    activation should not quantize it either."""
    return not (rows <= GEMV_MAX_M and dtype in (torch.bfloat16, torch.float16))


def takes_weight_only_gemv(x: torch.Tensor, config: Fp8Config | None) -> bool:
    """Whether fp8_linear multiplies x unquantized: rows the GEMV takes, and no Triton GEMM tiles named."""
    return config is None and not fp8_quantizes_activations(x.shape[0], x.dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: Fp8Config | None = None,
) -> torch.Tensor:
    """x [M, K] quantized per token, times the FP8 weight, in x's dtype: quant_reference.fp8_linear.

    One row of 16-bit activations (batch-1 decode) takes the weight-only GEMV instead, unquantized
    (kernels/fp8_gemv.py); a config names the Triton GEMM's tiles and keeps that path.
    """
    if takes_weight_only_gemv(x, config):
        return fp8_weight_only_gemv(x, weight, weight_scale, bias)
    x_q, x_scale = quantize_fp8_per_token(x)
    return fp8_matmul(x_q, x_scale, weight, weight_scale, x.dtype, bias, config)


def fp8_static_linear(x: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] quantized with a checkpoint's static input scale, times the FP8 weight:
    quant_reference.fp8_static_linear; one 16-bit row takes the weight-only GEMV, as in fp8_linear."""
    if takes_weight_only_gemv(x, None):
        return fp8_weight_only_gemv(x, weight, weight_scale, bias)
    return fp8_matmul(quantize_fp8_static(x, input_scale), input_scale, weight, weight_scale, x.dtype, bias)
