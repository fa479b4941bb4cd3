"""CPU half-precision linear (kernels.cpu_linear) against float32 math rounded once, on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import cpu_linear


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 accumulation, the output rounded once to the input's dtype (what a native half GEMM does)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 7, 48)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_widened_matches_float32_math(monkeypatch, dtype, shape, with_bias):
    """Blocks of 16 weight rows for up to 5 input rows, of 32 from 6 on, over 70 output features: several whole
    blocks and a ragged last one in both regimes."""
    monkeypatch.setattr(cpu_linear, "native_half_gemm", lambda _: False)
    monkeypatch.setattr(cpu_linear, "FEW_ROWS_BLOCK_ELEMENTS", 16 * 48)
    monkeypatch.setattr(cpu_linear, "MANY_ROWS_BLOCK_ELEMENTS", 32 * 48)
    monkeypatch.setattr(cpu_linear, "MANY_ROWS", 6)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=generator).to(dtype)
    weight = torch.randn(70, 48, generator=generator).to(dtype)
    bias = torch.randn(70, generator=generator).to(dtype) if with_bias else None
    out = cpu_linear.linear(x, weight, bias)
    assert out.shape == (*shape[:-1], 70) and out.dtype == dtype
    torch.testing.assert_close(out, reference(x, weight, bias))
    torch.testing.assert_close(out, F.linear(x, weight, bias))  # torch's own half-precision path agrees


def test_many_rows_widen_larger_blocks():
    """Decode-sized GEMMs widen cache-sized blocks, prefill-sized ones whole layer matrices (4096 x 576 here)."""
    assert cpu_linear.widened_block_rows(8, 576) == cpu_linear.FEW_ROWS_BLOCK_ELEMENTS // 576 < 4096
    assert cpu_linear.widened_block_rows(1024, 576) == cpu_linear.MANY_ROWS_BLOCK_ELEMENTS // 576 > 4096
    assert cpu_linear.widened_block_rows(1024, 1 << 24) == 1  # a row wider than the cap is still one block


def test_float32_is_plain_linear():
    generator = torch.Generator().manual_seed(1)
    x, weight = torch.randn(9, 32, generator=generator), torch.randn(40, 32, generator=generator)
    assert torch.equal(cpu_linear.linear(x, weight), F.linear(x, weight))
    assert cpu_linear.native_half_gemm(torch.float32)
