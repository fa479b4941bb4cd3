"""The quantized GEMM kernels (kernels/w4a16.py, kernels/fp8.py) against kernels/quant_reference.py.

On CPU they run under TRITON_INTERPRET=1 at small sizes in fp32/fp16; cases
marked `gpu` run at Llama-3.1-8B sizes in bf16. Weights are random floats
quantized by the reference quantizers, never zeros.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import kernels
from kernels import quant_reference as ref
from kernels import w4a16
from kernels.fp8 import Fp8Config
from kernels.fp8_gemv import Fp8GemvConfig
from kernels.split_k import choose_split_k
from kernels.w4a16 import DOT_MAX_M, W4A16Config, W4A16GemvConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (realistic sizes, bf16)")
FP8_TENSOR_CORES = CUDA and torch.cuda.get_device_capability() >= (8, 9)

# ‖out − ref‖ / ‖ref‖ allowed per activation dtype; the reference runs in fp32 on the same quantized inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# Hopper's FP8 tensor cores accumulate below fp32 precision: the Triton FP8 GEMM's float32 outputs
# differed from the fp32 reference by 7e-5 to 1.1e-4 (relative) on the H200, at K = 64 and 96.
FP8_MMA_FLOAT32_TOLERANCE = 3e-4 if torch.cuda.is_available() else TOLERANCE[torch.float32]


def fp8_tolerance(out_dtype: torch.dtype) -> float:
    return FP8_MMA_FLOAT32_TOLERANCE if out_dtype == torch.float32 else TOLERANCE[out_dtype]


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    return float((out.float() - expected.float()).norm() / expected.float().norm())


def random(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


# --- layout ------------------------------------------------------------------------------------------


def test_pack_unpack_round_trip_along_either_dim():
    q = torch.randint(0, 16, (24, 40), generator=torch.Generator().manual_seed(1))
    for dim in (0, 1):
        packed = ref.pack_int4(q, dim)
        assert packed.dtype == torch.int32 and packed.shape[dim] == q.shape[dim] // 8
        assert torch.equal(ref.unpack_int4(packed, dim), q)
    assert int(ref.pack_int4(torch.full((8, 1), 15), 0)) == -1  # all bits set: two's complement


def test_quantize_w4_is_close_to_the_float_weight():
    weight = random(64, 256)
    for group_size, zero_point in ((128, True), (128, False), (-1, True)):
        qweight, scales, zeros = ref.quantize_w4(weight, group_size, zero_point)
        groups = 256 // (256 if group_size == -1 else group_size)
        assert qweight.shape == (32, 64) and scales.shape == (groups, 64)
        assert (zeros is not None) == zero_point
        dequantized = ref.dequantize_w4(qweight, scales, zeros, 256 if group_size == -1 else group_size)
        assert relative_error(dequantized.t(), weight) < 0.12  # 4-bit round-to-nearest on Gaussian weights


# --- W4A16 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group_size,zero_point", [(32, True), (64, False), (-1, True)])
def test_w4a16_matches_reference(m, dtype, group_size, zero_point):
    k, n = 128, 96
    qweight, scales, zeros = ref.quantize_w4(random(n, k, seed=m), group_size, zero_point)
    scales = scales.to(dtype)
    zeros = zeros.to(dtype) if zeros is not None else None
    group = k if group_size == -1 else group_size
    x = random(m, k, dtype=dtype, seed=m + 1)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group)
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, ref.w4a16_matmul(x, qweight, scales, zeros, group)) < TOLERANCE[dtype]


@pytest.mark.parametrize("split_k,reduce_in_kernel", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("k,group_size", [(160, 32), (384, 128)])
def test_w4a16_split_k_with_bias_and_uneven_tiles(split_k, reduce_in_kernel, k, group_size):
    # N not a multiple of the tile, K split into uneven parts: every boundary is masked. Group 32 is
    # smaller than the K tile (each weight scaled); group 128 takes the one-scale-per-tile path.
    n, m = 72, 3
    qweight, scales, zeros = ref.quantize_w4(random(n, k), group_size, True)
    x, bias = random(m, k, seed=2), random(n, seed=3)
    config = W4A16Config(block_m=16, block_n=32, block_k=128, num_warps=1, num_stages=1, split_k=split_k,
                         reduce_in_kernel=reduce_in_kernel)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group_size, bias=bias, config=config)
    expected = ref.w4a16_matmul(x, qweight, scales, zeros, group_size, bias=bias)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("tiles,k_tiles,expected", [
    (32, 112, 8),  # Llama-3.1-8B down_proj GEMV: 9 splits would give 288 programs, three on some of 132 SMs
    (32, 32, 8),  # o_proj: 8 splits, two programs per SM
    (224, 32, 4),  # gate_up: already 224 programs; a few splits more each cost the same on the busiest SM
    (48, 3, 1),  # K too short to split (every split keeps at least 4 K tiles)
])
def test_split_k_fills_every_sm_without_a_partial_last_round(tiles, k_tiles, expected):
    splits = choose_split_k(tiles, k_tiles, programs_per_sm=2, processors=132)
    assert splits == expected


@pytest.mark.parametrize("split_k,reduce_in_kernel", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("m,block_m,dtype", [(1, 1, torch.float32), (2, 1, torch.float16), (3, 2, torch.float32),
                                             (3, 4, torch.float16)])
def test_w4a16_gemv_with_bias_split_k_and_uneven_columns(split_k, reduce_in_kernel, m, block_m, dtype):
    # The CUDA-core GEMV: N not a multiple of its tile, K split unevenly, and row blocks the rows do not fill.
    k, n, group = 192, 72, 32
    qweight, scales, zeros = ref.quantize_w4(random(n, k), group, True)
    scales, zeros = scales.to(dtype), zeros.to(dtype)
    x, bias = random(m, k, dtype=dtype, seed=2), random(n, dtype=dtype, seed=3)
    config = W4A16GemvConfig(block_n=32, rows=4, num_warps=1, num_stages=1, split_k=split_k,
                             reduce_in_kernel=reduce_in_kernel, block_m=block_m)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group, bias=bias, config=config)
    expected = ref.w4a16_matmul(x, qweight, scales, zeros, group, bias=bias)
    assert out.dtype == dtype and relative_error(out, expected) < TOLERANCE[dtype]


def test_w4a16_with_g_idx_in_any_order():
    # GPTQ act-order: each row's group comes from g_idx, not from its position.
    k, n, group = 128, 64, 32
    qweight, scales, zeros = ref.quantize_w4(random(n, k), group, True)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=torch.Generator().manual_seed(4))]
    g_idx = g_idx.to(torch.int32).to(DEVICE)
    x = random(7, k, seed=5)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group, g_idx=g_idx)
    expected = ref.w4a16_matmul(x, qweight, scales, zeros, group, g_idx=g_idx)
    assert relative_error(out, expected) < TOLERANCE[torch.float32]
    unordered = ref.w4a16_matmul(x, qweight, scales, zeros, group)
    assert relative_error(unordered, expected) > 1e-2  # the test would notice g_idx being ignored


@pytest.mark.parametrize("group_size,act_order", [(32, False), (128, False), (32, True)])
def test_w4a16_large_batches_dequantize_then_multiply(group_size, act_order):
    # Above DOT_MAX_M rows the weight is dequantized once (Triton) and multiplied densely.
    k, n, m = 256, 48, DOT_MAX_M + 3
    qweight, scales, zeros = ref.quantize_w4(random(n, k), group_size, True)
    order = (torch.arange(k) // group_size)[torch.randperm(k, generator=torch.Generator().manual_seed(6))]
    g_idx = order.to(torch.int32).to(DEVICE) if act_order else None
    x, bias = random(m, k, seed=7), random(n, seed=8)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx=g_idx, bias=bias)
    expected = ref.w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx=g_idx, bias=bias)
    assert out.shape == (m, n) and relative_error(out, expected) < TOLERANCE[torch.float32]
    dense = kernels.dequantize_w4a16(qweight, scales, zeros, group_size, g_idx, torch.float32)
    assert torch.equal(dense, ref.dequantize_w4(qweight, scales, zeros, group_size, g_idx))


def test_w4a16_large_batches_dequantize_a_block_of_columns_at_a_time(monkeypatch):
    # A weight larger than DEQUANT_CHUNK_BYTES is dequantized and multiplied in column blocks.
    k, n, m, group = 256, 320, DOT_MAX_M + 1, 64
    monkeypatch.setattr(w4a16, "DEQUANT_CHUNK_BYTES", 128 * k * 4)  # 128 fp32 columns per block
    qweight, scales, zeros = ref.quantize_w4(random(n, k), group, True)
    x, bias = random(m, k, seed=9), random(n, seed=10)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group, bias=bias)
    expected = ref.w4a16_matmul(x, qweight, scales, zeros, group, bias=bias)
    assert out.shape == (m, n) and relative_error(out, expected) < TOLERANCE[torch.float32]


def test_w4a16_rejects_a_weight_of_the_wrong_size():
    qweight, scales, zeros = ref.quantize_w4(random(32, 64), 32, True)
    with pytest.raises(ValueError, match="K=72"):
        kernels.w4a16_matmul(random(2, 72), qweight, scales, zeros, 32)


# --- FP8 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_per_token_quantization_matches_reference(dtype):
    x = random(6, 200, dtype=dtype) * torch.logspace(-3, 2, 6, device=DEVICE).to(dtype)[:, None]
    x[2] = 0  # an all-zero row keeps a finite scale
    q, scale = kernels.quantize_fp8_per_token(x)
    q_ref, scale_ref = ref.quantize_fp8_per_token(x)
    assert q.dtype == ref.FP8_DTYPE and scale.shape == (6, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), q_ref.float())  # exact: the kernel rounds to e4m3 itself


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_fp8_matmul_matches_reference(m, out_dtype):
    k, n = 96, 80
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, seed=6))
    x_q, x_scale = ref.quantize_fp8_per_token(random(m, k, seed=7))
    bias = random(n, seed=8).to(out_dtype)
    out = kernels.fp8_matmul(x_q, x_scale, weight, weight_scale, out_dtype, bias)
    assert out.dtype == out_dtype and out.shape == (m, n)
    expected = ref.fp8_matmul(x_q, x_scale, weight, weight_scale, out_dtype, bias)
    assert relative_error(out, expected) < fp8_tolerance(out_dtype)


@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduce_in_kernel", [True, False])
def test_fp8_linear_matches_reference(m, dtype, reduce_in_kernel):
    # What a layer calls: per-token quantization, then the Triton GEMM with K split in two.
    k, n = 160, 48
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, seed=10))
    x = random(m, k, dtype=dtype, seed=11) * torch.logspace(-2, 1, k, device=DEVICE).to(dtype)
    bias = random(n, seed=12).to(dtype)
    config = Fp8Config(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1, reduce_in_kernel=reduce_in_kernel)
    out = kernels.fp8_linear(x, weight, weight_scale, bias, config=config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, ref.fp8_linear(x, weight, weight_scale, bias)) < TOLERANCE[dtype]


@pytest.mark.parametrize("split_k,reduce_in_kernel", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("m,dtype", [(1, torch.float32), (2, torch.float16)])
def test_fp8_weight_only_gemv_with_bias_split_k_and_uneven_tiles(split_k, reduce_in_kernel, m, dtype):
    # N not a multiple of the row tile, K not a multiple of the K tile and split unevenly: every mask.
    k, n = 200, 40
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, seed=10))
    x = random(m, k, dtype=dtype, seed=11) * torch.logspace(-2, 1, k, device=DEVICE).to(dtype)
    bias = random(n, seed=12).to(dtype)
    config = Fp8GemvConfig(block_n=16, block_k=32, num_warps=1, num_stages=1, split_k=split_k,
                           reduce_in_kernel=reduce_in_kernel)
    out = kernels.fp8_weight_only_gemv(x, weight, weight_scale, bias, config=config)
    assert out.dtype == dtype and out.shape == (m, n)
    assert relative_error(out, ref.fp8_weight_only_matmul(x, weight, weight_scale, bias)) < TOLERANCE[dtype]


def test_fp8_linear_takes_the_weight_only_gemv_for_one_16_bit_row():
    # Batch-1 decode: no activation quantization, so the result is the 16-bit product's, not fp8_linear's.
    k, n = 256, 48
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, seed=10))
    x = random(1, k, dtype=torch.float16, seed=11) * torch.logspace(-2, 1, k, device=DEVICE).to(torch.float16)
    out = kernels.fp8_linear(x, weight, weight_scale)
    weight_only = ref.fp8_weight_only_matmul(x, weight, weight_scale)
    assert relative_error(out, weight_only) < TOLERANCE[torch.float16]
    assert relative_error(out, weight_only) < relative_error(ref.fp8_linear(x, weight, weight_scale), weight_only)


@pytest.mark.parametrize("m", [1, 4])
def test_fp8_static_linear_matches_reference_and_takes_the_gemv_for_one_row(m):
    # A checkpoint's static input scale: several rows are quantized with it; one 16-bit row is not.
    k, n = 96, 40
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, seed=13))
    x, bias = random(m, k, dtype=torch.float16, seed=14), random(n, dtype=torch.float16, seed=15)
    input_scale = x.abs().max().float().reshape(1) / ref.FP8_MAX
    out = kernels.fp8_static_linear(x, input_scale, weight, weight_scale, bias)
    expected = (ref.fp8_weight_only_matmul(x, weight, weight_scale, bias) if m == 1
                else ref.fp8_static_linear(x, input_scale, weight, weight_scale, bias))
    assert out.dtype == x.dtype and relative_error(out, expected) < TOLERANCE[torch.float16]


def test_fp8_matmul_with_one_static_activation_scale():
    k, n = 64, 48
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k))
    x = random(4, k, seed=9)
    scale = x.abs().max().float().reshape(1) / ref.FP8_MAX
    x_q = ref.quantize_fp8_static(x, scale)
    out = kernels.fp8_matmul(x_q, scale, weight, weight_scale, torch.float32)
    expected = ref.fp8_matmul(x_q, scale, weight, weight_scale, torch.float32)
    assert relative_error(out, expected) < fp8_tolerance(torch.float32)
    assert relative_error(out, x @ random(n, k).t()) < 0.06  # and it is still the float product


# --- GPU, Llama-3.1-8B shapes, bf16 ------------------------------------------------------------------

LLAMA_8B_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # (K, N): qkv, o, gate_up, down


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 2, 3, 16, 64, 256])
@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
@pytest.mark.parametrize("group_size", [128, -1])
def test_w4a16_bf16_gpu(m, k, n, group_size):
    qweight, scales, zeros = ref.quantize_w4(random(n, k, dtype=torch.bfloat16), group_size, True)
    group = k if group_size == -1 else group_size
    x = random(m, k, dtype=torch.bfloat16, seed=1)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, group)
    assert relative_error(out, ref.w4a16_matmul(x, qweight, scales, zeros, group)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m,config", [(1, W4A16GemvConfig(num_stages=3)),
                                      (1, W4A16GemvConfig(block_n=128, num_stages=4, split_k=8)),
                                      (1, W4A16GemvConfig(num_stages=1, reduce_in_kernel=False)),
                                      (2, W4A16GemvConfig(rows=8, block_m=2)), (3, W4A16GemvConfig(rows=8, block_m=4))],
                         ids=str)
@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
def test_w4a16_gemv_configs_bf16_gpu(m, config, k, n):
    # Loads pipelined through shared memory, both ways of adding the K splits, and several rows per program.
    qweight, scales, zeros = ref.quantize_w4(random(n, k, dtype=torch.bfloat16), 128, True)
    x, bias = random(m, k, dtype=torch.bfloat16, seed=1), random(n, dtype=torch.bfloat16, seed=2)
    out = kernels.w4a16_matmul(x, qweight, scales, zeros, 128, bias=bias, config=config)
    expected = ref.w4a16_matmul(x, qweight, scales, zeros, 128, bias=bias)
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@requires_gpu
def test_split_sums_in_kernel_are_deterministic_across_graph_replays_gpu():
    # The last program of a tile adds the partials in split order: any race (a partial read before it
    # was written, a counter not reset) shows up as a replay that differs from the first result.
    k, n = 14336, 4096
    qweight, scales, zeros = ref.quantize_w4(random(n, k, dtype=torch.bfloat16), 128, True)
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, dtype=torch.bfloat16, seed=3))
    x = random(1, k, dtype=torch.bfloat16, seed=1)
    x_q, x_scale = kernels.quantize_fp8_per_token(x)

    def gemms() -> tuple[torch.Tensor, ...]:
        return (kernels.w4a16_matmul(x, qweight, scales, zeros, 128, config=W4A16GemvConfig(split_k=16)),
                kernels.w4a16_matmul(x.expand(16, k).contiguous(), qweight, scales, zeros, 128,
                                     config=W4A16Config(16, 64, 128, split_k=4, reduce_in_kernel=True)),
                kernels.fp8_matmul(x_q, x_scale, weight, weight_scale, torch.bfloat16))

    first = [out.clone() for out in gemms()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = gemms()
    for _ in range(50):
        graph.replay()
        torch.cuda.synchronize()
        for out, expected in zip(outs, first):
            assert torch.equal(out, expected)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m", [1, 64, 256])
@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
def test_fp8_bf16_gpu(m, k, n):
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, dtype=torch.bfloat16))
    x = random(m, k, dtype=torch.bfloat16, seed=1)
    x_q, x_scale = kernels.quantize_fp8_per_token(x)
    q_ref, scale_ref = ref.quantize_fp8_per_token(x)
    # The kernel's scale may differ from torch's in the last bit, which can move a value across an
    # e4m3 rounding boundary: compare what the two quantizations stand for, not their bits.
    assert relative_error(x_q.float() * x_scale, q_ref.float() * scale_ref) < TOLERANCE[torch.bfloat16]
    out = kernels.fp8_matmul(x_q, x_scale, weight, weight_scale, torch.bfloat16)
    expected = ref.fp8_matmul(x_q, x_scale, weight, weight_scale, torch.bfloat16)
    assert relative_error(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("k,n", LLAMA_8B_SHAPES)
def test_fp8_weight_only_gemv_bf16_gpu(k, n):
    weight, weight_scale = ref.quantize_fp8_per_channel(random(n, k, dtype=torch.bfloat16))
    x, bias = random(1, k, dtype=torch.bfloat16, seed=1), random(n, dtype=torch.bfloat16, seed=2)
    out = kernels.fp8_linear(x, weight, weight_scale, bias)
    assert relative_error(out, ref.fp8_weight_only_matmul(x, weight, weight_scale, bias)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_TENSOR_CORES, reason="needs FP8 tensor cores (compute capability 8.9+)")
def test_fp8_triton_path_matches_scaled_mm_gpu():
    # 512 rows of bf16 output take _scaled_mm; fp16 output is outside its row-wise rules, so it takes
    # the Triton kernel with native FP8 dots.
    weight, weight_scale = ref.quantize_fp8_per_channel(random(4096, 4096, dtype=torch.bfloat16))
    x_q, x_scale = kernels.quantize_fp8_per_token(random(512, 4096, dtype=torch.bfloat16, seed=1))
    triton_out = kernels.fp8_matmul(x_q, x_scale, weight, weight_scale, torch.float16)
    scaled_mm_out = kernels.fp8_matmul(x_q, x_scale, weight, weight_scale, torch.bfloat16)
    assert relative_error(triton_out, scaled_mm_out) < TOLERANCE[torch.bfloat16]


@triton.jit
def _x_pairs_probe(x_ptr, out_ptr, ROWS: tl.constexpr):
    offs_r = tl.arange(0, ROWS)
    row_words = tl.full((1,), 0, tl.int32)
    pairs = w4a16._x_pairs(x_ptr.to(tl.pointer_type(tl.int32)), row_words, offs_r * 4, False)  # prmt: GPU only
    for j in tl.static_range(4):
        tl.store(out_ptr + j * ROWS + offs_r[None, :], pairs[j])


def test_w4a16_gemv_regroups_activations_into_nibble_pairs():
    # The GEMV's fast path multiplies nibbles j and j + 4 of an int32 by one (x_j, x_{j+4}) pair.
    rows = 4
    x = torch.arange(1, 8 * rows + 1, dtype=torch.int16, device=DEVICE)  # stand-ins for 16-bit floats
    out = torch.empty(4, rows, dtype=torch.int32, device=DEVICE)
    _x_pairs_probe[(1,)](x, out, ROWS=rows)
    for r in range(rows):
        for j in range(4):
            low, high = int(out[j, r]) & 0xFFFF, (int(out[j, r]) >> 16) & 0xFFFF
            assert (low, high) == (int(x[8 * r + j]), int(x[8 * r + j + 4]))


def test_w4a16_gemv_config_that_cannot_run_is_an_error():
    # An explicit GEMV config is never swapped for another kernel behind the caller's back.
    k, n, group = 128, 32, 32
    qweight, scales, zeros = ref.quantize_w4(random(n, k), group, True)
    config = W4A16GemvConfig(block_n=32, rows=16, num_warps=1, num_stages=1)  # 128 rows per step > group 32
    with pytest.raises(ValueError, match="GEMV cannot run"):
        kernels.w4a16_matmul(random(1, k), qweight, scales, zeros, group, config=config)
