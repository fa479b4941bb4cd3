"""Programmatic dependent launch (kernels/pdl.py): when it is on, and that it changes no result.

On a Hopper GPU a decode-shaped chain of kernels (norm, W4A16 and FP8 GEMVs with in-kernel
split sums, SiLU-and-mul, rotary, a norm with residual) is captured in a CUDA graph twice,
with PDL and without, and replayed many times: every output must be bit-identical. A kernel that
read its predecessor's output before waiting for it would show as a replay that differs.
"""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import pdl
from kernels import quant_reference as ref

CUDA = torch.cuda.is_available()
requires_hopper = pytest.mark.skipif(
    not CUDA or torch.cuda.get_device_capability() < (9, 0) or not pdl.LAUNCHER_SUPPORTS_PDL,
    reason="programmatic dependent launch needs a Hopper (compute capability 9.0+) GPU and a Triton that launches it",
)


def test_off_on_cpu_and_under_the_interpreter() -> None:
    assert pdl.launch_options(torch.device("cpu")) == {"PDL": False}
    assert not pdl.enabled(torch.device("cpu"))


def test_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pdl, "interpreted", lambda: False)
    monkeypatch.setenv("KUBELLM_PDL", "0")
    assert not pdl.enabled(torch.device("cuda", 0))
    assert pdl.launch_options(torch.device("cuda", 0)) == {"PDL": False}


def decode_chain(hidden: torch.Tensor, weights: dict[str, torch.Tensor | tuple]) -> list[torch.Tensor]:
    """One decoder layer's batch-1 kernels in their decode order; every intermediate is returned."""
    normed, residual = kernels.rms_norm(hidden, weights["norm"], 1e-5, residual=hidden)
    qkv = kernels.w4a16_matmul(normed, *weights["qkv"], 128)
    heads = qkv.view(1, -1, 128)
    rotated = kernels.apply_rotary(heads, weights["cos"], weights["sin"])
    o = kernels.fp8_linear(rotated.view(1, -1)[:, :hidden.shape[1]], *weights["o"])
    normed2, residual2 = kernels.rms_norm(o, weights["norm"], 1e-5, residual=residual)
    gate_up = kernels.w4a16_matmul(normed2, *weights["gate_up"], 128)
    act = kernels.silu_and_mul(gate_up)
    down = kernels.w4a16_matmul(act, *weights["down"], 128)
    return [normed, qkv, rotated, o, normed2, residual2, gate_up, act, down]


def captured_outputs(monkeypatch: pytest.MonkeyPatch, setting: str, hidden: torch.Tensor,
                     weights: dict[str, torch.Tensor | tuple], replays: int) -> list[list[torch.Tensor]]:
    monkeypatch.setenv("KUBELLM_PDL", setting)
    decode_chain(hidden, weights)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = decode_chain(hidden, weights)
    results = []
    for _ in range(replays):
        graph.replay()
        results.append([t.clone() for t in outputs])
    torch.cuda.synchronize()
    return results


def layer_weights(hidden: int, intermediate: int, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor | tuple]:
    """Random weights of one layer: W4A16 (group 128, zero points) qkv, gate_up and down; FP8 o; 128-dim heads."""
    gen = torch.Generator(device=device).manual_seed(0)

    def weight(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, generator=gen, device=device, dtype=dtype) * k**-0.5

    return {
        "norm": 1 + 0.1 * torch.randn(hidden, generator=gen, device=device, dtype=dtype),
        "qkv": ref.quantize_w4(weight(3 * hidden, hidden), 128, zero_point=True),
        "o": ref.quantize_fp8_per_channel(weight(hidden, hidden)),
        "gate_up": ref.quantize_w4(weight(2 * intermediate, hidden), 128, zero_point=True),
        "down": ref.quantize_w4(weight(hidden, intermediate), 128, zero_point=True),
        "cos": torch.rand(1, 1, 128, generator=gen, device=device, dtype=dtype),
        "sin": torch.rand(1, 1, 128, generator=gen, device=device, dtype=dtype),
    }


def test_decode_chain_runs() -> None:
    """The chain itself (shapes, formats) at small sizes on the suite's device (the interpreter without a GPU),
    so the Hopper test below checks only the launches."""
    device = "cuda" if CUDA else "cpu"
    weights = layer_weights(256, 512, device, torch.float32)
    outputs = decode_chain(torch.randn(1, 256, generator=torch.Generator(device=device).manual_seed(1),
                                       device=device), weights)
    assert outputs[-1].shape == (1, 256) and all(torch.isfinite(t.float()).all() for t in outputs)


@requires_hopper
def test_decode_chain_is_bit_identical_with_and_without_pdl(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Llama-3.1-8B layer's sizes at batch 1 (the GEMVs take their K splits, summed in the kernel)."""
    weights = layer_weights(4096, 14336, "cuda", torch.bfloat16)
    hidden = torch.randn(1, 4096, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda",
                         dtype=torch.bfloat16)
    with_pdl = captured_outputs(monkeypatch, "1", hidden, weights, replays=20)
    without = captured_outputs(monkeypatch, "0", hidden, weights, replays=2)
    for replay in with_pdl:
        for got, expected in zip(replay, without[0], strict=True):
            assert torch.equal(got, expected)
