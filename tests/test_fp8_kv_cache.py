"""FP8 KV cache (--kv-cache-dtype fp8): the cache-write kernel, both attention kernels and the CPU path.

Every reader of an FP8 cache must give the attention of its dequantized values
(entry * scale, exact in fp32), so the kernels are checked against the fp32
reference run on the dequantized cache, at the tolerances of the 16/32-bit
kernels; a second check bounds the quantization error itself against the
unquantized cache. Inputs are random, scales are not 1.0, and some values
exceed the FP8 range so the clamp is exercised.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import cpu_attention, reference
from kernels.random_inputs import PagedProblem, make_paged_problem
from kernels.reference import FP8_DTYPE, FP8_MAX, dequantize_kv, quantize_kv

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (realistic sizes, bf16)")

TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# ‖attention(fp8 cache) − attention(exact cache)‖ / ‖…‖: e4m3 keeps 3 mantissa bits (~3% per value,
# partly averaging out over a context).
QUANTIZATION_TOLERANCE = 0.08


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def scales(k: float, v: float, device: str = DEVICE) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(k, dtype=torch.float32, device=device), torch.tensor(v, dtype=torch.float32, device=device))


def fp8_problem(p: PagedProblem, k_scale: torch.Tensor, v_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The problem's caches stored as FP8 with these scales."""
    return quantize_kv(p.k_cache, FP8_DTYPE, k_scale), quantize_kv(p.v_cache, FP8_DTYPE, v_scale)


def dequantized_reference(p: PagedProblem, k8: torch.Tensor, v8: torch.Tensor, k_scale: torch.Tensor,
                          v_scale: torch.Tensor, decode: bool) -> torch.Tensor:
    k, v = dequantize_kv(k8, torch.float32, k_scale), dequantize_kv(v8, torch.float32, v_scale)
    if decode:
        return reference.paged_decode_attention(p.q.float(), k, v, p.block_tables, p.seq_lens, p.scale)
    return reference.paged_prefill_attention(p.q.float(), k, v, p.block_tables, p.query_start_loc, p.seq_lens,
                                             p.scale)


def exact_reference(p: PagedProblem, decode: bool) -> torch.Tensor:
    k, v = p.k_cache.float(), p.v_cache.float()
    if decode:
        return reference.paged_decode_attention(p.q.float(), k, v, p.block_tables, p.seq_lens, p.scale)
    return reference.paged_prefill_attention(p.q.float(), k, v, p.block_tables, p.query_start_loc, p.seq_lens,
                                             p.scale)


# ---- quantize / dequantize (the reference semantics) -------------------------------------------------


def test_quantize_divides_clamps_and_dequantize_multiplies_back():
    k_scale = torch.tensor(0.5)
    x = torch.tensor([1.0, -3.0, 0.3, 1000.0, -1000.0])
    stored = quantize_kv(x, FP8_DTYPE, k_scale)
    assert stored.dtype == FP8_DTYPE
    assert stored.float().tolist()[:2] == [2.0, -6.0] and stored.float().tolist()[3:] == [FP8_MAX, -FP8_MAX]
    assert dequantize_kv(stored, torch.float32, k_scale).tolist()[:2] == [1.0, -3.0]
    # 0.3 / 0.5 = 0.6 rounds to the nearest e4m3 value, 0.625 (3 mantissa bits).
    assert dequantize_kv(stored, torch.float32, k_scale)[2].item() == pytest.approx(0.3125)


def test_a_cache_in_the_model_dtype_ignores_scales():
    x = torch.randn(4, 2, 8)
    assert torch.equal(quantize_kv(x, torch.float32, torch.tensor(0.1)), x)
    assert torch.equal(dequantize_kv(x, torch.float32, torch.tensor(0.1)), x)


# ---- Triton kernels under the interpreter (CPU) or on the GPU, small sizes ------------------------


def interpreter_cast_slips(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Where Triton 3.7's interpreter casts fp32 to e4m3 unlike torch (round to nearest, ties to even):
    a mantissa that rounds up to the next power of two loses the carry (126.7 -> 64, not 128), ties
    go away from zero (116 -> 120, not 112), and subnormals (|x| < 2^-6) are not rounded alike. The
    GPU converts in hardware (cvt.rn.satfinite) and is held to the reference there."""
    power_of_two = want.abs() == torch.exp2(torch.log2(want.abs()).round())
    carry_lost = power_of_two & (got == want / 2)
    neighbour = (got - want).abs() <= want.abs() / 8  # one e4m3 step: 3 mantissa bits
    return carry_lost | neighbour | (want.abs() <= 2**-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32)])
def test_store_kvcache_quantizes_like_the_reference(dtype, head_dim, block_size):
    num_kv_heads, num_blocks = 2, 6
    gen = torch.Generator().manual_seed(head_dim + block_size)
    kv = (torch.randn(7, 2, num_kv_heads, head_dim, generator=gen) * 40).to(dtype=dtype, device=DEVICE)
    key, value = kv[:, 0], kv[:, 1]  # strided views of one fused tensor, as the model makes them
    slots = torch.tensor([0, block_size - 1, -1, block_size, 3 * block_size + 2, -1,
                          num_blocks * block_size - 1], device=DEVICE)
    start = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    cache = start.to(FP8_DTYPE).to(DEVICE)
    expected = cache.clone()
    k_scale, v_scale = scales(0.25, 0.07)
    kernels.store_kvcache(key, value, cache[0], cache[1], slots, k_scale=k_scale, v_scale=v_scale)
    reference.store_kvcache(key, value, expected[0], expected[1], slots, k_scale=k_scale, v_scale=v_scale)
    assert (value.float().abs() / 0.07 > FP8_MAX).any(), "the inputs should exercise the clamp"
    got, want = cache.float(), expected.float()
    differ = got != want
    if CUDA:  # the GPU's fp32 division may round a quotient on an FP8 rounding boundary the other way
        assert differ.float().mean() < 1e-3 and torch.allclose(got, want, rtol=0.125, atol=0)
    else:
        assert not (differ & ~interpreter_cast_slips(got, want)).any()
        assert differ.float().mean() < 0.01
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert torch.equal(cache.flatten(1, 2)[:, untouched.to(DEVICE)].float(),
                       start.to(FP8_DTYPE).flatten(1, 2)[:, untouched].float().to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,num_kv_heads", [(1, 2), (4, 2), (8, 1)])
def test_decode_reads_an_fp8_cache(dtype, group, num_kv_heads):
    block_size = 16
    p = make_paged_problem([1, block_size, block_size + 1, 2 * block_size + 5], [1] * 4, group * num_kv_heads,
                           num_kv_heads, 64, block_size, dtype, DEVICE, seed=group)
    k_scale, v_scale = scales(0.02, 0.5)
    k8, v8 = fp8_problem(p, k_scale, v_scale)
    out = kernels.paged_decode_attention(p.q, k8, v8, p.block_tables, p.seq_lens, p.scale,
                                         k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == dtype
    assert relative_error(out, dequantized_reference(p, k8, v8, k_scale, v_scale, decode=True)) < TOLERANCE[dtype]
    assert relative_error(out, exact_reference(p, decode=True)) < QUANTIZATION_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,num_kv_heads,sliding_window", [(1, 2, None), (4, 2, None), (2, 2, 7)])
def test_prefill_reads_an_fp8_cache(dtype, group, num_kv_heads, sliding_window):
    block_size = 16
    # Whole prompts, a decode row of a mixed batch, and a chunk behind a cached prefix.
    seq_lens, query_lens = [1, block_size, block_size + 1, 2 * block_size + 5], [1, block_size, 1, 9]
    p = make_paged_problem(seq_lens, query_lens, group * num_kv_heads, num_kv_heads, 64, block_size, dtype, DEVICE,
                           seed=group)
    k_scale, v_scale = scales(0.3, 0.011)
    k8, v8 = fp8_problem(p, k_scale, v_scale)
    out = kernels.paged_prefill_attention(p.q, k8, v8, p.block_tables, p.query_start_loc, p.seq_lens, p.scale,
                                          sliding_window=sliding_window,
                                          k_scale=k_scale, v_scale=v_scale)
    k, v = dequantize_kv(k8, torch.float32, k_scale), dequantize_kv(v8, torch.float32, v_scale)
    want = reference.paged_prefill_attention(p.q.float(), k, v, p.block_tables, p.query_start_loc, p.seq_lens,
                                             p.scale, sliding_window)
    assert relative_error(out, want) < TOLERANCE[dtype]


def test_decode_split_over_the_context_scales_every_split():
    from kernels.attention import LaunchConfig

    p = make_paged_problem([1, 9, 40], [1, 1, 1], 4, 2, 64, 16, torch.float32, DEVICE)
    k_scale, v_scale = scales(0.1, 3.0)
    k8, v8 = fp8_problem(p, k_scale, v_scale)
    config = LaunchConfig(block_n=16, num_warps=1, num_stages=1, num_splits=3)
    out = kernels.paged_decode_attention(p.q, k8, v8, p.block_tables, p.seq_lens, p.scale, config=config,
                                         k_scale=k_scale, v_scale=v_scale)
    want = dequantized_reference(p, k8, v8, k_scale, v_scale, decode=True)
    assert relative_error(out, want) < TOLERANCE[torch.float32]


# ---- the CPU backend ------------------------------------------------------------------------


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_cpu_attention_reads_an_fp8_cache(sliding_window):
    seq_lens, query_lens = [1, 16, 17, 37], [1, 16, 1, 9]
    p = make_paged_problem(seq_lens, query_lens, 8, 2, 64, 16, torch.float32, "cpu")
    k_scale, v_scale = scales(0.05, 0.2, "cpu")
    k8, v8 = fp8_problem(p, k_scale, v_scale)
    out = cpu_attention.paged_prefill_attention(p.q, k8, v8, p.block_tables, p.query_start_loc, p.seq_lens,
                                                p.scale, sliding_window, k_scale=k_scale, v_scale=v_scale)
    k, v = dequantize_kv(k8, torch.float32, k_scale), dequantize_kv(v8, torch.float32, v_scale)
    want = reference.paged_prefill_attention(p.q, k, v, p.block_tables, p.query_start_loc, p.seq_lens, p.scale,
                                             sliding_window)
    assert relative_error(out, want) < 1e-5


# ---- realistic sizes, bf16, GPU only --------------------------------------------------------


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 128), (14, 2, 64)], ids=["llama8b", "qwen0.5b"])
@pytest.mark.gpu
@requires_gpu
def test_fp8_decode_and_prefill_bf16_gpu(num_heads, num_kv_heads, head_dim):
    for decode, seq_lens, query_lens in ((True, [32768, 4000, 1, 2049] * 4, [1] * 16),
                                         (False, [4096, 6000, 700, 1, 33, 2049], [4096, 1024, 1, 1, 33, 512])):
        p = make_paged_problem(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, 16, torch.bfloat16, DEVICE)
        k_scale, v_scale = scales(0.01, 0.02)
        k8, v8 = fp8_problem(p, k_scale, v_scale)
        if decode:
            out = kernels.paged_decode_attention(p.q, k8, v8, p.block_tables, p.seq_lens, p.scale,
                                                 k_scale=k_scale, v_scale=v_scale)
        else:
            out = kernels.paged_prefill_attention(p.q, k8, v8, p.block_tables, p.query_start_loc, p.seq_lens,
                                                  p.scale, k_scale=k_scale, v_scale=v_scale)
        want = dequantized_reference(p, k8, v8, k_scale, v_scale, decode)
        assert relative_error(out, want) < TOLERANCE[torch.bfloat16]
