"""The Triton kernels against their torch reference (kernels/reference.py).

Without a GPU these run under TRITON_INTERPRET=1 (tests/conftest.py sets it)
at small sizes in fp32/fp16, because the interpreter's bf16 tl.dot is broken.
Cases marked `gpu` run at realistic sizes in bf16 and are skipped on CPU.
The reference always runs in fp32 on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from engine.block_manager import FREED_BLOCK
from kernels import reference
from kernels.attention import LaunchConfig
from kernels.random_inputs import PagedProblem, make_paged_problem

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (realistic sizes, bf16)")

# ‖out − ref‖ / ‖ref‖ allowed per input dtype (fp32 dots run in IEEE fp32, not tf32).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), "kernel output has NaN/inf"
    error = (out.float() - ref.float()).norm() / ref.float().norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e} over {TOLERANCE[dtype]:.0e}"


def fp32_reference_decode(p: PagedProblem, sliding_window: int | None = None) -> torch.Tensor:
    return reference.paged_decode_attention(
        p.q.float(), p.k_cache.float(), p.v_cache.float(), p.block_tables, p.seq_lens, p.scale, sliding_window)


def fp32_reference_prefill(p: PagedProblem, sliding_window: int | None = None) -> torch.Tensor:
    return reference.paged_prefill_attention(
        p.q.float(), p.k_cache.float(), p.v_cache.float(), p.block_tables, p.query_start_loc,
        p.seq_lens, p.scale, sliding_window)


def small_shapes() -> list:
    """head_dim x GQA ratio x block size, each paired with a CPU-safe dtype."""
    params = []
    for head_dim in (64, 128):
        for group in (1, 4, 8):
            for block_size in (16, 32):
                dtype = torch.float16 if (group + block_size) % 3 == 0 else torch.float32
                num_kv_heads = 2 if group < 8 else 1
                params.append(pytest.param(head_dim, group, num_kv_heads, block_size, dtype,
                                           id=f"d{head_dim}-g{group}-bs{block_size}-{str(dtype)[6:]}"))
    return params


def ragged_seq_lens(block_size: int) -> list[int]:
    """Length 1, exact block boundaries, one past a boundary, and a multi-block tail."""
    return [1, block_size, block_size + 1, 2 * block_size + 5]


@pytest.mark.parametrize("head_dim,group,num_kv_heads,block_size,dtype", small_shapes())
def test_decode_matches_reference(head_dim, group, num_kv_heads, block_size, dtype):
    seq_lens = ragged_seq_lens(block_size)
    p = make_paged_problem(seq_lens, [1] * len(seq_lens), group * num_kv_heads, num_kv_heads,
                           head_dim, block_size, dtype, DEVICE)
    out = kernels.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale)
    assert_close(out, fp32_reference_decode(p), dtype)


@pytest.mark.parametrize("head_dim,group,num_kv_heads,block_size,dtype", small_shapes())
def test_prefill_matches_reference(head_dim, group, num_kv_heads, block_size, dtype):
    # Whole prompts, a decode row inside a mixed batch, and chunks behind a cached prefix.
    seq_lens = [1, block_size, block_size + 1, 2 * block_size + 5, 2 * block_size]
    query_lens = [1, block_size, 1, block_size + 3, 5]
    p = make_paged_problem(seq_lens, query_lens, group * num_kv_heads, num_kv_heads,
                           head_dim, block_size, dtype, DEVICE)
    out = kernels.paged_prefill_attention(p.q, p.k_cache, p.v_cache, p.block_tables,
                                          p.query_start_loc, p.seq_lens, p.scale)
    assert_close(out, fp32_reference_prefill(p), dtype)


def test_decode_merges_splits_including_empty_ones():
    # Three splits over contexts of 1..40 tokens: short sequences leave splits empty.
    p = make_paged_problem([1, 9, 40], [1, 1, 1], 4, 2, 64, 16, torch.float32, DEVICE)
    config = LaunchConfig(block_n=16, num_warps=1, num_stages=1, num_splits=3)
    out = kernels.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens,
                                         p.scale, config=config)
    assert_close(out, fp32_reference_decode(p), torch.float32)


def test_decode_padding_slot_gives_zeros_and_leaves_others_alone():
    # A CUDA-graph batch is padded with length-0 sequences: finite zeros, no effect on real ones.
    p = make_paged_problem([20, 1], [1, 1], 4, 2, 64, 16, torch.float32, DEVICE)
    padded_lens = torch.tensor([20, 0], dtype=torch.int32, device=DEVICE)
    out = kernels.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables, padded_lens, p.scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out[:1], fp32_reference_decode(p)[:1], torch.float32)


def test_prefill_reads_queries_from_a_strided_view():
    # The model slices q out of a fused qkv projection: rows are strided, heads contiguous.
    p = make_paged_problem([17, 33], [17, 8], 4, 2, 64, 16, torch.float32, DEVICE)
    fused = torch.cat([p.q.flatten(1), torch.randn(p.q.shape[0], 2 * 2 * 64, device=DEVICE)], dim=1)
    q_view = fused[:, : 4 * 64].view(-1, 4, 64)
    assert not q_view.is_contiguous()
    out = kernels.paged_prefill_attention(q_view, p.k_cache, p.v_cache, p.block_tables,
                                          p.query_start_loc, p.seq_lens, p.scale)
    assert_close(out, fp32_reference_prefill(p), torch.float32)


def release_blocks_outside_windows(p: PagedProblem, window: int) -> int:
    """Every block wholly before a sequence's first query's window, as the block manager leaves it:
    its table entry FREED_BLOCK and (as if handed to another sequence) its contents NaN."""
    block_size = p.k_cache.shape[1]
    query_lens = (p.query_start_loc[1:] - p.query_start_loc[:-1]).tolist()
    released = 0
    for b, (seq_len, q_len) in enumerate(zip(p.seq_lens.tolist(), query_lens)):
        first_needed = max(0, seq_len - q_len - window + 1)
        for index in range(first_needed // block_size):
            block = int(p.block_tables[b, index])
            p.k_cache[block] = float("nan")
            p.v_cache[block] = float("nan")
            p.block_tables[b, index] = FREED_BLOCK
            released += 1
    return released


@pytest.mark.parametrize(("window", "dtype"), [(1, torch.float32), (5, torch.float16), (40, torch.float32)])
def test_sliding_window_prefill_matches_reference_and_skips_blocks_outside(window, dtype):
    # Whole prompts, chunks behind a long cached context, and decode rows, all longer than the window.
    seq_lens, query_lens = [70, 90, 33, 64, 1], [70, 20, 1, 17, 1]
    p = make_paged_problem(seq_lens, query_lens, 8, 2, 64, 16, dtype, DEVICE)
    full_attention = fp32_reference_prefill(p)
    assert release_blocks_outside_windows(p, window) > 0
    out = kernels.paged_prefill_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.query_start_loc,
                                          p.seq_lens, p.scale, sliding_window=window)
    expected = fp32_reference_prefill(p, window)
    assert torch.isfinite(expected).all()
    assert_close(out, expected, dtype)
    assert not torch.allclose(expected, full_attention, atol=1e-3)  # the window matters


@pytest.mark.parametrize(("window", "num_splits"), [(1, 1), (7, 3), (32, 0)])
def test_sliding_window_decode_matches_reference_and_skips_blocks_outside(window, num_splits):
    p = make_paged_problem([1, 9, 40, 100], [1] * 4, 4, 2, 64, 16, torch.float32, DEVICE)
    assert release_blocks_outside_windows(p, window) > 0
    config = LaunchConfig(block_n=16, num_warps=1, num_stages=1, num_splits=num_splits)
    out = kernels.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale,
                                         config=config, sliding_window=window)
    assert_close(out, fp32_reference_decode(p, window), torch.float32)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kvcache_matches_reference(head_dim, block_size, dtype):
    num_kv_heads, num_blocks = 2, 6
    gen = torch.Generator().manual_seed(head_dim + block_size)
    # key/value are strided views of one fused tensor, as the model produces them.
    kv = torch.randn(7, 2, num_kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    key, value = kv[:, 0], kv[:, 1]
    slots = torch.tensor([0, block_size - 1, -1, block_size, 3 * block_size + 2, -1,
                          num_blocks * block_size - 1], device=DEVICE)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEVICE)
    expected = cache.clone()
    kernels.store_kvcache(key, value, cache[0], cache[1], slots)
    reference.store_kvcache(key, value, expected[0], expected[1], slots)
    assert torch.equal(cache, expected)


# ---- realistic sizes, bf16, GPU only -------------------------------------------------------

GPU_SHAPES = [  # (num_heads, num_kv_heads, head_dim): Llama-3.1-8B, Qwen2.5-0.5B, an MHA model
    pytest.param(32, 8, 128, id="llama8b"),
    pytest.param(14, 2, 64, id="qwen0.5b"),
    pytest.param(16, 16, 128, id="mha"),
]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", GPU_SHAPES)
@pytest.mark.parametrize("batch,max_len", [(1, 32768), (8, 4096), (128, 2048)])
@pytest.mark.gpu
@requires_gpu
def test_decode_bf16_gpu(batch, max_len, num_heads, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    seq_lens[0] = max_len
    p = make_paged_problem(seq_lens, [1] * batch, num_heads, num_kv_heads, head_dim, block_size,
                           torch.bfloat16, DEVICE)
    out = kernels.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.block_tables, p.seq_lens, p.scale)
    assert_close(out, fp32_reference_decode(p), torch.bfloat16)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", GPU_SHAPES)
@pytest.mark.gpu
@requires_gpu
def test_prefill_bf16_gpu(num_heads, num_kv_heads, head_dim, block_size):
    # A whole 4k prompt, a chunk behind a 6k prefix, decode rows and short prompts, mixed.
    seq_lens = [4096, 6000, 700, 1, 33, 2049]
    query_lens = [4096, 1024, 1, 1, 33, 512]
    p = make_paged_problem(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size,
                           torch.bfloat16, DEVICE)
    out = kernels.paged_prefill_attention(p.q, p.k_cache, p.v_cache, p.block_tables,
                                          p.query_start_loc, p.seq_lens, p.scale)
    assert_close(out, fp32_reference_prefill(p), torch.bfloat16)


# ---- fused elementwise kernels vs the engine's torch layers (run on CPU copies) --------------

FUSED_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("hidden", [64, 896])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_layer(dtype, hidden, with_residual):
    from engine.layers.layernorm import RMSNorm

    gen = torch.Generator().manual_seed(hidden)
    layer = RMSNorm(hidden, eps=1e-5)
    layer.weight.data = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    x = torch.randn(5, hidden, generator=gen).to(dtype)
    residual = torch.randn(5, hidden, generator=gen).to(dtype) if with_residual else None
    expected = layer(x, residual)  # CPU: the torch path
    got = kernels.rms_norm(x.to(DEVICE), layer.weight.to(DEVICE), 1e-5,
                           residual.to(DEVICE) if with_residual else None)
    for want, have in zip(expected if with_residual else (expected,), got if with_residual else (got,)):
        assert have.dtype == dtype and have.shape == want.shape
        torch.testing.assert_close(have.cpu(), want, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("d", [128, 4864])
def test_silu_and_mul_matches_layer(dtype, d):
    from engine.layers.activation import SiluAndMul

    x = torch.randn(3, 2 * d, generator=torch.Generator().manual_seed(d)).to(dtype)
    expected = SiluAndMul()(x)
    got = kernels.silu_and_mul(x.to(DEVICE)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("num_heads,head_dim", [(4, 64), (14, 64), (8, 128)])
def test_rotary_matches_layer_on_a_strided_view(dtype, num_heads, head_dim):
    from engine.layers.rotary_embedding import RotaryEmbedding, apply_rotary
    from engine.model_config import RopeConfig

    rope = RotaryEmbedding(head_dim, 4096, RopeConfig(rope_type="default", theta=10000.0))
    positions = torch.tensor([0, 1, 7, 1000, 4095])
    cos, sin = rope(positions, dtype)
    gen = torch.Generator().manual_seed(num_heads)
    fused = torch.randn(5, (num_heads + 2) * head_dim, generator=gen).to(dtype)  # q then other heads
    q = fused[:, : num_heads * head_dim].view(5, num_heads, head_dim)
    expected = apply_rotary(q, cos, sin)  # CPU: the torch path
    q_dev = fused.to(DEVICE)[:, : num_heads * head_dim].view(5, num_heads, head_dim)
    got = kernels.apply_rotary(q_dev, cos.to(DEVICE), sin.to(DEVICE)).cpu()
    # Same rounding steps as torch, but on the GPU a few sums that nearly cancel land one
    # unit of the operands' last place apart (seen on an H200), so allow one such unit.
    one_ulp = torch.finfo(dtype).eps * q.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=max(1e-5, one_ulp))
