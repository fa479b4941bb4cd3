"""Tensor parallelism splits quantized checkpoints correctly: packed axes, group scales and act order.

Each rank's layer is built and loaded on its own (no process group; rank and size
are explicit). Column-parallel outputs of the ranks must be the single-rank
layer's output sliced, row-parallel partial sums must add up to it. FP8 with
per-token activation scales is compared with the float product instead: each
rank scales its own slice of the activation, so sums differ in rounding.
"""

from __future__ import annotations

import pytest
import torch

from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.quantization import quantization_scope
from engine.layers.quantization.config import linear_method_for
from engine.testing.quantized import QUANTIZED_FORMATS, quantization_config, quantize_linear_weight

GROUP_SIZE = 32
HIDDEN, INTERMEDIATE, HEAD_DIM = 64, 256, 16
W4_TOLERANCE, FP8_TOLERANCE = 1e-5, 0.08  # relative to the single-rank (W4) or float (FP8) output


def method_for(fmt: str):
    if fmt == "fp8-online":
        return linear_method_for("fp8", None, "test")
    return linear_method_for(None, quantization_config(fmt, GROUP_SIZE, zero_point=True), "test")


def checkpoint(fmt: str, weight: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    if fmt == "fp8-online":
        return {"weight": weight}
    generator = torch.Generator().manual_seed(seed)  # parts of one fused layer share an act order
    return quantize_linear_weight(fmt, weight, GROUP_SIZE, True, torch.float32, generator)


def build(fmt: str, make_layer, parts: dict[object, dict[str, torch.Tensor]]):
    with quantization_scope(method_for(fmt)):
        layer = make_layer()
    for shard_id, tensors in parts.items():
        for name, tensor in tensors.items():
            param = layer._parameters.get(name)
            if param is not None:  # e.g. weight_shape, or g_idx without act order: not read
                param.weight_loader(param, tensor, shard_id)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out - expected).norm() / expected.norm())


FORMATS = [*QUANTIZED_FORMATS, "fp8-online"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp", [2, 4])
def test_merged_column_parallel_shards(fmt, tp):
    gen = torch.Generator().manual_seed(1)
    gate, up = (torch.randn(INTERMEDIATE, HIDDEN, generator=gen) * HIDDEN**-0.5 for _ in "gu")
    parts = {0: checkpoint(fmt, gate, 7), 1: checkpoint(fmt, up, 7)}
    x = torch.randn(5, HIDDEN, generator=gen)
    full = build(fmt, lambda: MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE] * 2, tp_rank=0, tp_size=1), parts)(x)
    outputs = [build(fmt, lambda: MergedColumnParallelLinear(HIDDEN, [INTERMEDIATE] * 2, tp_rank=rank, tp_size=tp),
                     parts)(x) for rank in range(tp)]
    # Each rank holds its slice of gate, then its slice of up.
    gates = torch.cat([out[:, : INTERMEDIATE // tp] for out in outputs], dim=1)
    ups = torch.cat([out[:, INTERMEDIATE // tp:] for out in outputs], dim=1)
    assert relative_error(torch.cat([gates, ups], dim=1), full) < W4_TOLERANCE
    dense = torch.cat([x @ gate.t(), x @ up.t()], dim=1)
    assert relative_error(full, dense) < (FP8_TOLERANCE if fmt.startswith("fp8") else 0.3)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("kv_heads", "tp"), [(2, 2), (1, 2), (4, 4)])
def test_qkv_parallel_shards_with_replicated_kv_heads(fmt, kv_heads, tp):
    heads = 4
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(heads * HEAD_DIM, HIDDEN, generator=gen) * HIDDEN**-0.5
    k, v = (torch.randn(kv_heads * HEAD_DIM, HIDDEN, generator=gen) * HIDDEN**-0.5 for _ in "kv")
    parts = {"q": checkpoint(fmt, q, 9), "k": checkpoint(fmt, k, 9), "v": checkpoint(fmt, v, 9)}
    x = torch.randn(3, HIDDEN, generator=gen)
    full = build(fmt, lambda: QKVParallelLinear(HIDDEN, HEAD_DIM, heads, kv_heads, tp_rank=0, tp_size=1), parts)(x)
    full_q, full_k, full_v = full.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=1)
    for rank in range(tp):
        layer = build(fmt, lambda: QKVParallelLinear(HIDDEN, HEAD_DIM, heads, kv_heads, tp_rank=rank, tp_size=tp),
                      parts)
        local_q, local_k, local_v = layer(x).split([layer.q_size, layer.kv_size, layer.kv_size], dim=1)
        kv_head = rank * kv_heads // tp
        kv_cols = slice(kv_head * HEAD_DIM, kv_head * HEAD_DIM + layer.kv_size)
        assert relative_error(local_q, full_q[:, rank * layer.q_size: (rank + 1) * layer.q_size]) < W4_TOLERANCE
        assert relative_error(local_k, full_k[:, kv_cols]) < W4_TOLERANCE
        assert relative_error(local_v, full_v[:, kv_cols]) < W4_TOLERANCE


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_partial_sums(fmt, tp):
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(HIDDEN, INTERMEDIATE, generator=gen) * INTERMEDIATE**-0.5
    parts = {None: checkpoint(fmt, weight, 11)}
    x = torch.randn(4, INTERMEDIATE, generator=gen)
    full = build(fmt, lambda: RowParallelLinear(INTERMEDIATE, HIDDEN, tp_rank=0, tp_size=1), parts)(x)
    cols = INTERMEDIATE // tp
    total = sum(
        layer.quant_method.apply(layer, x[:, rank * cols: (rank + 1) * cols], None)
        for rank, layer in enumerate(
            build(fmt, lambda: RowParallelLinear(INTERMEDIATE, HIDDEN, tp_rank=r, tp_size=tp), parts)
            for r in range(tp)
        )
    )
    if fmt.startswith("fp8"):
        assert relative_error(total, x @ weight.t()) < FP8_TOLERANCE
    else:
        assert relative_error(total, full) < W4_TOLERANCE


def test_act_order_row_shard_keeps_full_scales_and_looks_groups_up():
    # A GPTQ desc_act shard holds rows of every group: it cannot slice the scales by position.
    weight = torch.randn(HIDDEN, INTERMEDIATE, generator=torch.Generator().manual_seed(4))
    parts = {None: checkpoint("gptq-act-order", weight, 5)}
    layer = build("gptq-act-order", lambda: RowParallelLinear(INTERMEDIATE, HIDDEN, tp_rank=1, tp_size=2), parts)
    assert layer.scales.shape == (INTERMEDIATE // GROUP_SIZE, HIDDEN) and layer.g_idx is not None
    single = build("gptq-act-order", lambda: RowParallelLinear(INTERMEDIATE, HIDDEN, tp_rank=0, tp_size=1), parts)
    assert single.g_idx is None and single.input_perm is not None  # one rank: sorted rows are whole groups


def test_group_that_straddles_a_shard_is_refused():
    with pytest.raises(ValueError, match="group size 32 does not divide .* 16 input features"):
        with quantization_scope(method_for("awq")):
            RowParallelLinear(64, 64, tp_rank=0, tp_size=4)
