"""The fused MoE Triton kernel against its torch reference, expert sharding, and expert checkpoint loading.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py) at
small sizes in fp32/fp16. The reference itself is checked against transformers
through the Mixtral and Qwen3-MoE models in tests/test_models_vs_hf.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernels
from engine.errors import ModelLoadError
from engine.layers.moe import FusedExperts, route
from engine.model_config import MoeConfig, load_model_config
from engine.models.loader import load_model
from kernels import moe_reference
from kernels.moe import GemvLaunchConfig, MoeLaunchConfig, align_by_expert, default_moe_config

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_moe(num_tokens: int, hidden: int, inter: int, num_experts: int, top_k: int, dtype: torch.dtype,
               seed: int = 0) -> tuple[torch.Tensor, ...]:
    """x, w13, w2, routing weights and ids; weights scaled so activations stay of order one."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) * inter**-0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = route(logits, top_k, renormalize=True)
    cast = (t.to(dtype=dtype, device=DEVICE) for t in (x, w13, w2))
    return (*cast, weights.to(DEVICE), ids.to(DEVICE))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and torch.isfinite(out).all()
    error = (out.float() - ref.float()).norm() / ref.float().norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e} over {TOLERANCE[dtype]:.0e}"


@pytest.mark.parametrize("block_m", [16, 64])
def test_alignment_sorts_every_pair_into_single_expert_blocks(block_m):
    ids = torch.randint(0, 6, (37, 3), generator=torch.Generator().manual_seed(block_m)).to(DEVICE)
    ids[:, 1] = (ids[:, 0] + 1) % 6  # no token picks one expert twice, as top-k guarantees
    ids[:, 2] = (ids[:, 0] + 2) % 6
    flat = ids.flatten().cpu()
    alignment = align_by_expert(ids, num_experts=8, block_m=block_m)  # experts 6, 7 get no tokens
    sorted_ids, block_experts = alignment.sorted_ids.cpu(), alignment.block_experts.cpu()
    used = int(alignment.num_padded)
    real = sorted_ids[sorted_ids < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # each pair exactly once
    assert (sorted_ids[used:] == flat.numel()).all() and used % block_m == 0
    for block, expert in enumerate(block_experts.tolist()):
        pairs = sorted_ids[block * block_m : (block + 1) * block_m]
        pairs = pairs[pairs < flat.numel()]
        if block * block_m >= used:
            assert expert == -1 and pairs.numel() == 0
        else:
            assert pairs.numel() > 0 and (flat[pairs] == expert).all()


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "dtype"),
    [(1, 8, 2, torch.float32), (7, 4, 2, torch.float16), (33, 8, 3, torch.float32), (20, 16, 8, torch.float16)],
)
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k, dtype):
    x, w13, w2, weights, ids = random_moe(num_tokens, 48, 40, num_experts, top_k, dtype, seed=num_tokens)
    out = kernels.fused_moe(x, w13, w2, weights, ids)
    expected = moe_reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert_close(out, expected, dtype)


BOTH_PATHS = pytest.mark.parametrize(
    "config", [GemvLaunchConfig(block_n=16, block_k=32, num_warps=1),
               MoeLaunchConfig(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)], ids=["gemv", "grouped"])


@BOTH_PATHS
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(1, 16, 4), (5, 4, 2)])
def test_both_paths_match_reference_also_when_pairs_share_experts(config, num_tokens, num_experts, top_k):
    """5 tokens over 4 experts share them; the GEMV path stays exact there, only slower."""
    x, w13, w2, weights, ids = random_moe(num_tokens, 48, 40, num_experts, top_k, torch.float32, seed=num_tokens)
    out = kernels.fused_moe(x, w13, w2, weights, ids, config=config)
    assert_close(out, moe_reference.fused_moe(x, w13, w2, weights, ids), torch.float32)


def test_decode_batches_take_the_gemv_path_until_pairs_would_share_experts():
    assert isinstance(default_moe_config(num_tokens=1, top_k=2, num_experts=8), GemvLaunchConfig)  # Mixtral b1
    assert isinstance(default_moe_config(num_tokens=2, top_k=2, num_experts=8), MoeLaunchConfig)
    assert isinstance(default_moe_config(num_tokens=4, top_k=8, num_experts=128), GemvLaunchConfig)  # Qwen3-30B
    assert isinstance(default_moe_config(num_tokens=5, top_k=8, num_experts=128), MoeLaunchConfig)


@BOTH_PATHS
def test_fused_moe_reads_hidden_states_from_a_strided_view(config):
    x, w13, w2, weights, ids = random_moe(9, 32, 32, 4, 2, torch.float32, seed=3)
    wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :32]  # rows strided, as after a split
    assert not wide.is_contiguous()
    assert_close(kernels.fused_moe(wide, w13, w2, weights, ids, config=config), moe_reference.fused_moe(x, w13, w2, weights, ids),
                 torch.float32)


def test_fused_moe_rejects_mismatched_expert_weights():
    x, w13, w2, weights, ids = random_moe(3, 32, 32, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="do not fit hidden size 32"):
        kernels.fused_moe(x, w13, w2[:, :, :16], weights, ids)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_experts_split_by_intermediate_dimension_sum_to_the_whole(tp_size):
    """Each rank holds I / tp of every expert; the ranks' partial outputs add up to the unsharded MoE."""
    moe = MoeConfig(num_experts=4, top_k=2, intermediate_size=32, norm_topk_prob=True, sparse_layers=(True,))
    hidden = 16
    gen = torch.Generator().manual_seed(tp_size)
    gate, up = (torch.randn(4, 32, hidden, generator=gen) for _ in range(2))
    down = torch.randn(4, hidden, 32, generator=gen)
    x = torch.randn(5, hidden, generator=gen)
    weights, ids = route(torch.randn(5, 4, generator=gen), 2, renormalize=True)
    whole = moe_reference.fused_moe(x, torch.cat([gate, up], dim=1), down, weights, ids)
    partial_sum = torch.zeros_like(whole)
    for rank in range(tp_size):
        experts = FusedExperts(moe, hidden, tp_rank=rank, tp_size=tp_size)
        for expert in range(4):
            for part, full in enumerate((gate[expert], up[expert], down[expert])):
                param = experts.w2_weight if part == 2 else experts.w13_weight
                param.weight_loader(param, full, (expert, part))
        assert experts.w13_weight.shape == (4, 2 * 32 // tp_size, hidden)
        partial_sum += moe_reference.fused_moe(x, experts.w13_weight, experts.w2_weight, weights, ids)
    torch.testing.assert_close(partial_sum, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_missing_or_misshapen_expert_tensor_is_named(tiny_model_folder, tmp_path, family):
    folder = shutil.copytree(tiny_model_folder(family), tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    mlp = "block_sparse_moe" if family == "mixtral" else "mlp"
    up = "w3" if family == "mixtral" else "up_proj"
    name = f"model.layers.0.{mlp}.experts.3.{up}.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"missing 1 tensor.*{name}"):
        load_model(folder, load_model_config(folder), dtype="float32")
    save_file({**tensors, name: tensors[name][:, :-1].contiguous()}, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match=f"tensor {name} has shape"):
        load_model(folder, load_model_config(folder), dtype="float32")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (realistic sizes, bf16)")
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 256])
def test_fused_moe_bf16_at_qwen3_30b_a3b_shape(num_tokens):
    x, w13, w2, weights, ids = random_moe(num_tokens, 2048, 768, 128, 8, torch.bfloat16, seed=num_tokens)
    out = kernels.fused_moe(x, w13, w2, weights, ids)
    expected = moe_reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert_close(out, expected, torch.bfloat16)
