"""4-bit weight-only linear layers (W4A16) from AWQ, GPTQ and compressed-tensors checkpoints.

Each format is loaded in its own layout (so tensor parallelism slices it like
any tensor), then converted once to the engine's layout (kernels/quant_reference.py):

  AutoAWQ "gemm":  qweight int32 [K, N/8] packed along N in the order 0 2 4 6 1 3 5 7,
                   qzeros int32 [K/G, N/8] (same order), scales [K/G, N]; W = (q - z) * s
  GPTQ:            qweight int32 [K/8, N] packed along K, qzeros int32 [K/G, N/8] storing
                   z - 1 (checkpoint_format "gptq"; "gptq_v2" stores z), scales [K/G, N],
                   g_idx int32 [K] (the group of each input row; only read with desc_act)
  compressed-tensors pack-quantized: weight_packed int32 [N, K/8] packed along K holding
                   q + 8 for signed q in -8..7, weight_scale [N, K/G], weight_zero_point
                   int32 [N/8, K/G] (asymmetric only, packed like the weight along N),
                   weight_g_idx int32 [K] (actorder "group")

Act-order (desc_act) checkpoints quantized input rows in a permuted order. At load
the rows are sorted by group, so groups are contiguous again, and the same
permutation is applied to the activations at run time (one gather of x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import kernels
from engine.errors import ModelLoadError
from engine.layers.quantization.base import LinearMethod, ParamLayout, add_param, replace_param
from kernels import quant_reference
from kernels.quant_reference import PACK_FACTOR, SYMMETRIC_ZERO, pack_int4, unpack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8
AWQ_UNDO_ORDER = tuple(AWQ_ORDER.index(column) for column in range(PACK_FACTOR))
CHECKPOINT_FORMATS = ("awq", "gptq", "gptq_v2", "compressed-tensors")


@dataclass(frozen=True)
class W4A16Scheme:
    checkpoint_format: str  # one of CHECKPOINT_FORMATS
    group_size: int  # -1: one scale per output channel
    zero_point: bool  # the checkpoint stores zero points (asymmetric)
    act_order: bool  # rows' groups come from g_idx

    def __post_init__(self) -> None:
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"unknown 4-bit checkpoint format {self.checkpoint_format!r}")


class W4A16LinearMethod(LinearMethod):
    def __init__(self, scheme: W4A16Scheme):
        self.scheme = scheme

    def group_size(self, full_input_size: int) -> int:
        return full_input_size if self.scheme.group_size == -1 else self.scheme.group_size

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, full_input_size: int) -> None:
        scheme = self.scheme
        group = self.group_size(full_input_size)
        if input_size % PACK_FACTOR or output_size % PACK_FACTOR:
            raise ValueError(f"4-bit layer of {input_size} x {output_size} features is not packable by {PACK_FACTOR}")
        # Scales cover the rank's own input rows, except when they cannot: one scale for all
        # rows (per channel), or act-order rows whose groups are anywhere in the full layer.
        replicated = scheme.group_size == -1 or (scheme.act_order and input_size != full_input_size)
        if not replicated and input_size % group:
            raise ValueError(
                f"group size {group} does not divide this tensor-parallel rank's {input_size} input features"
            )
        groups = (full_input_size if replicated else input_size) // group
        group_dim = None if replicated else 1
        dtype = torch.get_default_dtype()
        layer.group_size = group
        if scheme.checkpoint_format == "compressed-tensors":
            g_rows = ParamLayout(output_dim=0, input_dim=group_dim, input_pack=group)
            add_param(layer, "weight_packed", (output_size, input_size // PACK_FACTOR), torch.int32,
                      ParamLayout(output_dim=0, input_dim=1, input_pack=PACK_FACTOR))
            add_param(layer, "weight_scale", (output_size, groups), dtype, g_rows)
            if scheme.zero_point:
                add_param(layer, "weight_zero_point", (output_size // PACK_FACTOR, groups), torch.int32,
                          ParamLayout(output_dim=0, input_dim=group_dim, output_pack=PACK_FACTOR, input_pack=group))
            if scheme.act_order:
                add_param(layer, "weight_g_idx", (input_size,), torch.int32, ParamLayout(None, 0))
                layer.weight_g_idx.store = _same_for_every_part(layer.weight_g_idx)
            return
        g_cols = ParamLayout(output_dim=1, input_dim=None if replicated else 0, input_pack=group)
        if scheme.checkpoint_format == "awq":
            add_param(layer, "qweight", (input_size, output_size // PACK_FACTOR), torch.int32,
                      ParamLayout(output_dim=1, input_dim=0, output_pack=PACK_FACTOR))
        else:
            add_param(layer, "qweight", (input_size // PACK_FACTOR, output_size), torch.int32,
                      ParamLayout(output_dim=1, input_dim=0, input_pack=PACK_FACTOR))
        add_param(layer, "scales", (groups, output_size), dtype, g_cols)
        if scheme.zero_point:
            add_param(layer, "qzeros", (groups, output_size // PACK_FACTOR), torch.int32,
                      ParamLayout(output_dim=1, input_dim=g_cols.input_dim, output_pack=PACK_FACTOR, input_pack=group))
        if scheme.act_order:
            add_param(layer, "g_idx", (input_size,), torch.int32, ParamLayout(None, 0))
            layer.g_idx.store = _same_for_every_part(layer.g_idx)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scales, zeros, g_idx = self._unpack_checkpoint(layer)
        perm = None
        if g_idx is not None:
            perm = torch.argsort(g_idx, stable=True)
            q, g_idx = q[perm], g_idx[perm]
            g_idx, scales, zeros = _contiguous_groups(g_idx, scales, zeros, layer.group_size)
        if zeros is not None and bool((zeros == SYMMETRIC_ZERO).all()):
            zeros = None  # symmetric GPTQ stores its zeros: the kernel's constant zero is the same, and faster
        for name in [name for name in layer._parameters if name != "bias"]:
            replace_param(layer, name, None)
        replace_param(layer, "qweight", pack_int4(q, 0))
        replace_param(layer, "scales", scales.contiguous())
        replace_param(layer, "zeros", zeros.to(scales.dtype).contiguous() if zeros is not None else None)
        replace_param(layer, "g_idx", g_idx.to(torch.int32).contiguous() if g_idx is not None else None)
        layer.register_buffer("input_perm", perm)

    def _unpack_checkpoint(
        self, layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The checkpoint layout unpacked: (q [K, N] 0..15, scales [groups, N], zeros or None, g_idx or None)."""
        scheme = self.scheme
        if scheme.checkpoint_format == "compressed-tensors":
            q = unpack_int4(layer.weight_packed.data, 1).t()
            scales = layer.weight_scale.data.t()
            zeros = None
            if scheme.zero_point:
                zeros = unpack_int4(layer.weight_zero_point.data, 0).t()
            g_idx = layer.weight_g_idx.data if scheme.act_order else None
            return q, scales, zeros, g_idx
        if scheme.checkpoint_format == "awq":
            q = _undo_awq_order(unpack_int4(layer.qweight.data, 1))
        else:
            q = unpack_int4(layer.qweight.data, 0)
        zeros = None
        if scheme.zero_point:
            zeros = unpack_int4(layer.qzeros.data, 1)
            if scheme.checkpoint_format == "awq":
                zeros = _undo_awq_order(zeros)
            elif scheme.checkpoint_format == "gptq":
                zeros = (zeros + 1) & 0xF  # v1 stores z - 1 (AutoGPTQ masks the sum the same way)
        g_idx = layer.g_idx.data if scheme.act_order else None
        return q, layer.scales.data, zeros, g_idx

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        backend = kernels if x.is_cuda else quant_reference
        x2 = x.reshape(-1, x.shape[-1])
        if layer.input_perm is not None:
            x2 = x2.index_select(1, layer.input_perm)
        y = backend.w4a16_matmul(x2, layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.g_idx, bias)
        return y.reshape(*x.shape[:-1], -1)


def _same_for_every_part(param: nn.Parameter):
    """A g_idx store: fused parts (q/k/v, gate/up) read one input, so their act order must agree."""
    loaded = []

    def store(rows: slice, tensor: torch.Tensor) -> None:
        if loaded and not torch.equal(param.data, tensor.to(param.dtype)):
            raise ModelLoadError("act-order g_idx differs between parts of one fused layer (q/k/v or gate/up); "
                                 "parts that read the same input must share it")
        param.data.copy_(tensor)
        loaded.append(True)

    return store


def _undo_awq_order(values: torch.Tensor) -> torch.Tensor:
    """Columns unpacked from AWQ int32s (in packing order) back to their natural order."""
    rows, cols = values.shape
    return values.reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)[..., list(AWQ_UNDO_ORDER)].reshape(rows, cols)


def _contiguous_groups(
    sorted_g_idx: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """After sorting rows by group: drop g_idx when the rows form whole consecutive groups.

    Then the fast kernel path (one group per tile) applies and only this rank's
    groups' scales are kept. A tensor-parallel shard of an act-order layer usually
    holds parts of many groups; it keeps g_idx and the full scales.
    """
    k = sorted_g_idx.numel()
    first = int(sorted_g_idx[0])
    expected = first + torch.arange(k, device=sorted_g_idx.device) // group_size
    if k % group_size or not torch.equal(sorted_g_idx.long(), expected):
        return sorted_g_idx, scales, zeros
    groups = slice(first, first + k // group_size)
    return None, scales[groups], zeros[groups] if zeros is not None else None
