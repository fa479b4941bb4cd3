"""The engine's one layout for quantized weights, and torch references of the quantized GEMMs.

W4A16 (4-bit weights, 16-bit activations). Every 4-bit checkpoint format (AWQ,
GPTQ, compressed-tensors pack-quantized) is converted at load to this layout:

    qweight: int32 [K // 8, N]   nibble j (bits 4j..4j+3) of qweight[r, n] is q[8r + j, n], q in 0..15
    scales:  [K // G, N]         activation dtype; G is the group size (G == K: per output channel)
    zeros:   [K // G, N] or None activation dtype, integer values; None means the symmetric zero 8
    g_idx:   int32 [K] or None   group of each input row when rows are not grouped in order (GPTQ act-order)

    W[k, n] = (q[k, n] - zero[g(k), n]) * scale[g(k), n],   y = x @ W   (W is [K, N], nn.Linear's weight transposed)

FP8 (e4m3 weights, activations quantized per token at run time, or with one static scale):

    weight:       float8_e4m3fn [N, K]   (nn.Linear's layout)
    weight_scale: float32 [N]             per output channel (per-tensor checkpoints are broadcast)
    y = (x_q * x_scale[:, None]) @ (weight * weight_scale[:, None])^T

These references define what the Triton kernels (kernels/w4a16.py, kernels/fp8.py) compute.
"""

from __future__ import annotations

import torch

PACK_FACTOR = 8  # 4-bit values per int32
SYMMETRIC_ZERO = 8
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # keeps all-zero rows finite (vLLM's floor)


def pack_int4(q: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Values 0..15 -> int32 with 8 consecutive entries along `dim` per element (entry j in bits 4j..4j+3)."""
    q = q.movedim(dim, -1).to(torch.int64)
    if q.shape[-1] % PACK_FACTOR:
        raise ValueError(f"cannot pack {q.shape[-1]} 4-bit values along dim {dim}: not a multiple of {PACK_FACTOR}")
    q = q.reshape(*q.shape[:-1], -1, PACK_FACTOR)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    packed = (q << shifts).sum(-1)  # nibbles never overlap, so the sum is an OR
    return ((packed + 2**31) % 2**32 - 2**31).to(torch.int32).movedim(-1, dim).contiguous()  # two's complement


def unpack_int4(packed: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The inverse of pack_int4: int32 -> int32 values 0..15, 8x longer along `dim`."""
    packed = packed.movedim(dim, -1).to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    q = (packed.unsqueeze(-1) >> shifts) & 0xF
    return q.reshape(*packed.shape[:-1], -1).movedim(-1, dim).contiguous()


def group_index(k: int, group_size: int, g_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """g(k) for every input row: g_idx when given, else consecutive groups of group_size."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(k, device=device) // group_size


def dequantize_w4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The [K, N] float32 weight a W4A16 layout stands for."""
    q = unpack_int4(qweight, 0).float()
    groups = group_index(q.shape[0], group_size, g_idx, q.device)
    zero = zeros.float()[groups] if zeros is not None else SYMMETRIC_ZERO
    return (q - zero) * scales.float()[groups]


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] in float32, then cast to x's dtype."""
    y = x.float() @ dequantize_w4(qweight, scales, zeros, group_size, g_idx)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_w4(
    weight: torch.Tensor, group_size: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest 4-bit quantization of an nn.Linear weight [N, K] into the engine's layout.

    Asymmetric (zero_point) uses each group's min..max; symmetric uses +-max with zero 8.
    Used by tests and benchmarks to make quantized weights from float ones.
    """
    n, k = weight.shape
    group_size = k if group_size == -1 else group_size
    w = weight.float().t().reshape(k // group_size, group_size, n)  # [groups, G, N]
    if zero_point:
        low, high = w.amin(1), w.amax(1)
        scales = ((high - low) / 15).clamp(min=1e-8)
        zeros = (-low / scales).round().clamp(0, 15)
    else:
        scales = (w.abs().amax(1) / 7.5).clamp(min=1e-8)
        zeros = torch.full_like(scales, SYMMETRIC_ZERO)
    q = (w / scales[:, None] + zeros[:, None]).round().clamp(0, 15).reshape(k, n)
    dtype = weight.dtype
    return pack_int4(q, 0), scales.to(dtype), zeros.to(dtype) if zero_point else None


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8 e4m3 [M, K], float32 scale [M, 1]) with each row's amax mapped to 448."""
    scale = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] quantized with one given scale (a checkpoint's static input_scale)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An nn.Linear weight [N, K] -> (float8 [N, K], float32 scale [N]): each row's amax maps to 448."""
    quantized, scale = quantize_fp8_per_token(weight)
    return quantized, scale.squeeze(-1)


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x_q * x_scale) @ (weight * weight_scale)^T in float32, cast to out_dtype.

    x_scale: [M, 1] per token or a single value; weight_scale: [N] per channel.
    """
    y = (x_q.float() @ weight.float().t()) * x_scale.float().reshape(-1, 1) * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * weight_scale)^T (+ bias) in float32, cast to x's dtype: FP8 weights, 16-bit activations."""
    y = x.float() @ (weight.float() * weight_scale.float().reshape(-1, 1)).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_static_linear(x: torch.Tensor, input_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] quantized with a checkpoint's one static input scale, then fp8_matmul, in x's dtype."""
    return fp8_matmul(quantize_fp8_static(x, input_scale), input_scale, weight, weight_scale, x.dtype, bias)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] quantized per token, then fp8_matmul with the FP8 weight, in x's dtype."""
    x_q, x_scale = quantize_fp8_per_token(x)
    return fp8_matmul(x_q, x_scale, weight, weight_scale, x.dtype, bias)
