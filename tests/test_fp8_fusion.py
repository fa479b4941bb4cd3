"""RMSNorm and SiLU-and-mul quantizing their output for an FP8 linear in the same launch.

The fused kernels must give exactly what the unfused path gives (the norm or
activation kernel, then kernels.quantize_fp8_per_token): the same e4m3 bytes,
the same float32 scales. On CPU they run under TRITON_INTERPRET=1 at small
sizes in fp32/fp16 (the interpreter's bf16 arithmetic is broken); the `gpu`
cases run at Llama-3.1-8B sizes in bf16.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import quant_reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_fp8_gpu = pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a CUDA GPU with FP8 (compute capability 8.9+) for bf16 at Llama-3.1-8B sizes",
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


def rows_of_many_magnitudes(rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows scaled from 1e-3 to 1e2; the third (if any) all zeros, which takes the scale's floor."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=gen) * torch.logspace(-3, 2, rows)[:, None]
    if rows > 2:
        x[2] = 0
    return x.to(dtype=dtype, device=DEVICE)


def assert_same_fp8(values: torch.Tensor, scale: torch.Tensor, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The same e4m3 bytes and the same float32 scales."""
    expected_values, expected_scale = expected
    assert values.dtype == ref.FP8_DTYPE and scale.dtype == torch.float32
    assert values.shape == expected_values.shape and scale.shape == expected_scale.shape
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


def assert_same_as_torch(values: torch.Tensor, scale: torch.Tensor, activation: torch.Tensor) -> None:
    """The values and scales torch's quantizer gives; torch keeps the sign of a negative value that
    rounds to zero and the interpreter's cast does not, so values are compared as numbers (-0 == 0)."""
    expected_values, expected_scale = ref.quantize_fp8_per_token(activation)
    assert torch.equal(values.float(), expected_values.float()) and torch.equal(scale, expected_scale)


def assert_zero_row_takes_the_floor(values: torch.Tensor, scale: torch.Tensor) -> None:
    assert torch.equal(scale[2], torch.full((1,), ref.FP8_MIN_SCALE, device=DEVICE)) and not values[2].float().any()


# --- the fused kernels against the two launches they replace ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 200, 896])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_is_the_norm_then_per_token_quantization(dtype, hidden, with_residual):
    wide = rows_of_many_magnitudes(6, hidden + 8, dtype, seed=hidden)
    x = wide[:, :hidden]  # a strided view, as a residual stream slice can be
    residual = rows_of_many_magnitudes(6, hidden, dtype, seed=hidden + 1) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=torch.Generator().manual_seed(3))).to(dtype=dtype, device=DEVICE)
    values, scale, residual_out = kernels.rms_norm_fp8(x, weight, 1e-5, residual)
    unfused = kernels.rms_norm(x, weight, 1e-5, residual)
    normed = unfused[0] if with_residual else unfused
    assert_same_fp8(values, scale, kernels.quantize_fp8_per_token(normed))
    assert_same_as_torch(values, scale, normed)
    assert_zero_row_takes_the_floor(values, scale)
    if with_residual:
        assert residual_out is not None and torch.equal(residual_out, unfused[1])
    else:
        assert residual_out is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 100, 200, 1000])
def test_silu_and_mul_fp8_is_the_activation_then_per_token_quantization(dtype, d):
    # Under the interpreter a row is quantized 64 values at a time: d > 64 takes the two-pass path.
    x = rows_of_many_magnitudes(5, 2 * d, dtype, seed=d)
    values, scale = kernels.silu_and_mul_fp8(x)
    product = kernels.silu_and_mul(x)
    assert_same_fp8(values, scale, kernels.quantize_fp8_per_token(product))
    assert_same_as_torch(values, scale, product)
    assert_zero_row_takes_the_floor(values, scale)


def test_fused_kernels_take_no_rows():
    empty = torch.empty(0, 64, device=DEVICE)
    values, scale, residual_out = kernels.rms_norm_fp8(empty, torch.ones(64, device=DEVICE), 1e-5, empty)
    assert values.shape == (0, 64) and scale.shape == (0, 1) and residual_out is not None
    values, scale = kernels.silu_and_mul_fp8(empty)
    assert values.shape == (0, 32) and scale.shape == (0, 1)


# --- GPU, Llama-3.1-8B sizes, bf16 ---------------------------------------------------------------------


@pytest.mark.gpu
@requires_fp8_gpu
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_fp8_bf16_gpu(m, with_residual):
    hidden = 4096
    x = rows_of_many_magnitudes(m, hidden, torch.bfloat16, seed=m)
    residual = rows_of_many_magnitudes(m, hidden, torch.bfloat16, seed=m + 1) if with_residual else None
    weight = torch.randn(hidden, device=DEVICE, dtype=torch.bfloat16)
    values, scale, _ = kernels.rms_norm_fp8(x, weight, 1e-5, residual)
    unfused = kernels.rms_norm(x, weight, 1e-5, residual)
    assert_same_fp8(values, scale, kernels.quantize_fp8_per_token(unfused[0] if with_residual else unfused))


@pytest.mark.gpu
@requires_fp8_gpu
@pytest.mark.parametrize("m", [1, 16, 256])
@pytest.mark.parametrize("d", [14336, 28672, 3584])  # 8B's intermediate; 70B's (two passes); 8B's at TP 4
def test_silu_and_mul_fp8_bf16_gpu(m, d):
    x = rows_of_many_magnitudes(m, 2 * d, torch.bfloat16, seed=d)
    values, scale = kernels.silu_and_mul_fp8(x)
    assert_same_fp8(values, scale, kernels.quantize_fp8_per_token(kernels.silu_and_mul(x)))
