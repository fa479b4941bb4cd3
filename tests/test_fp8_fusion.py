"""RMSNorm and SiLU-and-mul quantizing their output for an FP8 linear in the same launch.

The fused kernels must give exactly what the unfused path gives (the norm or
activation kernel, then kernels.quantize_fp8_per_token): the same e4m3 bytes,
the same float32 scales, and so the same logits from a whole FP8 model. On CPU
they run under TRITON_INTERPRET=1 at small sizes in fp32/fp16 (the
interpreter's bf16 arithmetic is broken); the `gpu` cases run in bf16, the
kernels at Llama-3.1-8B sizes.
"""

from __future__ import annotations

import pytest
import torch

import kernels
import kernels.fp8
from engine.layers.activation import GeluTanhAndMul, SiluAndMul
from engine.layers.layernorm import GemmaRMSNorm, RMSNorm
from engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from engine.layers.quantization import quantization_scope
from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.config import linear_method_for
from engine.layers.quantization.fp8 import Fp8LinearMethod
from engine.layers.quantization.fp8_activation import Fp8Activation
from engine.model_config import load_model_config
from engine.models.loader import load_model
from engine.testing.quantized import quantization_config
from kernels import quant_reference as ref
from kernels.interpreter import interpreted
from test_models_vs_hf import allocate_cache, run_step, step_metadata

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
    """The same e4m3 bytes and the same float32 scales (under the interpreter, exactly).

    On the GPU two kernels may sum a row's squares in different orders, and Triton's fp32 division
    is not correctly rounded, so a scale can differ in its last bit (seen on the H200). A value that
    lies on a rounding boundary then lands one e4m3 step away: allowed for one value in a thousand.
    """
    expected_values, expected_scale = expected
    assert values.dtype == ref.FP8_DTYPE and scale.dtype == torch.float32
    assert values.shape == expected_values.shape and scale.shape == expected_scale.shape
    assert_same_codes(values, expected_values)
    if values.is_cuda:
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
    else:
        assert torch.equal(scale, expected_scale)


def assert_same_codes(values: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal e4m3 values (as numbers: -0 == 0); on the GPU a few may be one step away (assert_same_fp8)."""
    if not values.is_cuda:
        assert torch.equal(values.float(), expected.float())
        return
    codes, expected_codes = values.view(torch.uint8).int(), expected.view(torch.uint8).int()
    moved = (codes != expected_codes) & ((values.float() != 0) | (expected.float() != 0))
    assert moved.float().mean() <= 1e-3 and ((codes - expected_codes)[moved].abs() == 1).all()


def assert_same_as_torch(values: torch.Tensor, scale: torch.Tensor, activation: torch.Tensor) -> None:
    """The values and scales torch's quantizer gives; torch keeps the sign of a negative value that
    rounds to zero and the interpreter's cast does not, so values are compared as numbers (-0 == 0)."""
    assert_same_fp8(values, scale, ref.quantize_fp8_per_token(activation))


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


# --- which layers take FP8 activations, and who quantizes for them ------------------------------------


def fp8_checkpoint_method(activation_scheme: str) -> LinearMethod:
    method = linear_method_for(None, {"quant_method": "fp8", "activation_scheme": activation_scheme}, "test")
    assert method is not None
    return method


def test_only_fp8_methods_with_per_token_scales_take_fp8_activations():
    assert linear_method_for("fp8", None, "test").takes_fp8_activation()  # online
    assert fp8_checkpoint_method("dynamic").takes_fp8_activation()
    assert linear_method_for(None, quantization_config("fp8-channel", 32, True), "test").takes_fp8_activation()
    assert not fp8_checkpoint_method("static").takes_fp8_activation()  # the checkpoint's scale, not per token
    assert not linear_method_for(None, quantization_config("awq", 32, True), "test").takes_fp8_activation()
    assert not LinearMethod().takes_fp8_activation()


def online_fp8_linear(weight: torch.Tensor) -> RowParallelLinear:
    """A one-rank linear layer (on the current default device) with `weight` quantized as `--quantization fp8` does."""
    with quantization_scope(linear_method_for("fp8", None, "test")):
        layer = RowParallelLinear(weight.shape[1], weight.shape[0], bias=False, tp_rank=0, tp_size=1)
    layer.weight.weight_loader(layer.weight, weight)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def test_an_fp8_linear_gives_the_same_output_from_its_quantized_input():
    gen = torch.Generator().manual_seed(5)
    layer = online_fp8_linear(torch.randn(48, 96, generator=gen))
    x = torch.randn(7, 96, generator=gen)
    quantized = Fp8Activation(*ref.quantize_fp8_per_token(x), dtype=x.dtype)
    assert torch.equal(layer(quantized), layer(x))


@pytest.mark.parametrize("method", [LinearMethod(), fp8_checkpoint_method("static")], ids=["dense", "fp8-static"])
def test_layers_that_take_16_bit_activations_refuse_fp8_ones(method):
    with quantization_scope(method):
        layer = MergedColumnParallelLinear(64, [32, 32], tp_rank=0, tp_size=1)
    assert not layer.takes_fp8_activation
    quantized = Fp8Activation(*ref.quantize_fp8_per_token(torch.randn(3, 64)), dtype=torch.float32)
    with pytest.raises(TypeError, match="16-bit activations"):
        layer(quantized)


def test_norms_and_activations_without_a_fused_kernel_refuse_to_quantize():
    with pytest.raises(ValueError, match="GemmaRMSNorm has no fused kernel"):
        GemmaRMSNorm(64, fp8_output=True)
    with pytest.raises(ValueError, match="GeluTanhAndMul has no fused kernel"):
        GeluTanhAndMul(fp8_output=True)


def fp8_outputs(model: torch.nn.Module) -> list[tuple[bool, bool, bool | None]]:
    """Per decoder layer: (input norm, post-attention norm, MLP activation) quantize for their consumer."""
    flags = []
    for layer in model.model.layers:
        act_fn = getattr(getattr(layer, "mlp", None), "act_fn", None)
        flags.append((layer.input_layernorm.fp8_output, layer.post_attention_layernorm.fp8_output,
                      act_fn.fp8_output if act_fn is not None else None))
    return flags


@pytest.mark.parametrize("family,quantization,expected", [
    ("llama", "fp8", [(True, True, True)] * 2),
    ("qwen3", "fp8", [(True, True, True)] * 2),
    ("llama", None, [(False, False, False)] * 2),
    # a sparse layer's post-attention norm feeds the router and experts, not a linear that takes FP8
    ("qwen3_moe", "fp8", [(True, False, None), (True, True, True)]),
    ("gemma3", "fp8", [(False, False, False)] * 3),  # Gemma's norms and GeGLU have no fused kernel
])
def test_decoder_layers_fuse_where_the_next_layer_takes_fp8(tiny_model_folder, family, quantization, expected):
    folder = tiny_model_folder(family)
    model = load_model(folder, load_model_config(folder), dtype="float32", device="cpu", quantization=quantization)
    assert fp8_outputs(model) == expected
    assert not model.model.norm.fp8_output  # the LM head is not FP8


# --- a whole FP8 model, fused and not ------------------------------------------------------------------


@pytest.fixture
def triton_path(monkeypatch):
    """Run the engine's CUDA code path: on a GPU as it is; on CPU, with its Triton kernels under the
    interpreter, by reporting CPU tensors as CUDA ones (layers pick their kernels by `x.is_cuda`)."""

    def enter() -> None:
        if not CUDA:
            assert interpreted(), "the Triton path on CPU tensors needs TRITON_INTERPRET=1"
            monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))

    return enter


def greedy_run(folder, dtype: str, steps: int, triton_path) -> tuple[list[torch.Tensor], list[int], int]:
    """Prefill a prompt, then decode `steps` tokens greedily: (each step's logits, the tokens, the
    number of separate per-token quantization launches)."""
    model = load_model(folder, load_model_config(folder), dtype=dtype, device=DEVICE, quantization="fp8")
    allocate_cache(model)
    launches = []
    quantize = kernels.fp8.quantize_fp8_per_token
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.fp8, "quantize_fp8_per_token", lambda x: launches.append(x.shape) or quantize(x))
        triton_path()
        table, tokens = [3, 0, 5], [5, 17, 3, 99, 42, 7, 250, 31, 8]
        logits = [run_step(model, tokens, list(range(len(tokens))), step_metadata([(table, 0, len(tokens))], DEVICE))]
        for _ in range(steps):
            tokens.append(int(logits[-1][-1].argmax()))
            position = len(tokens) - 1
            logits.append(run_step(model, tokens[-1:], [position], step_metadata([(table, position, 1)], DEVICE)))
    return logits, tokens, len(launches)


TRITON_DTYPE = "bfloat16" if CUDA else "float16"  # 16-bit: the norm's and activation's rounding matters


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_fused_fp8_model_gives_the_unfused_logits(tiny_model_folder, family, triton_path, monkeypatch):
    folder = tiny_model_folder(family)
    steps = 3
    fused_logits, fused_tokens, fused_launches = greedy_run(folder, TRITON_DTYPE, steps, triton_path)
    monkeypatch.setattr(Fp8LinearMethod, "takes_fp8_activation", lambda self: False)  # every layer quantizes
    logits, tokens, launches = greedy_run(folder, TRITON_DTYPE, steps, triton_path)
    assert fused_tokens == tokens
    for fused, unfused in zip(fused_logits, logits, strict=True):
        assert torch.equal(fused, unfused)
    layers, dense_mlps = (2, 2) if family == "llama" else (2, 1)
    # Only the prompt's pass quantizes: the decode steps' single 16-bit rows go to the weight-only GEMV
    # unquantized, fused or not (kernels.fp8_quantizes_activations).
    # Unfused: the inputs of every layer's qkv_proj and o_proj and of every dense MLP's gate_up_proj and
    # down_proj (Qwen3-MoE's first layer is sparse: its router and experts are not FP8 linear layers).
    assert launches == 2 * layers + 2 * dense_mlps
    assert fused_launches == layers  # only o_proj's input (the attention output) is left


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


GPU_8B = (pytest.mark.gpu, requires_fp8_gpu)


@pytest.mark.parametrize("m,hidden,intermediate", [
    (5, 64, 200),  # on CPU under the interpreter, in fp16
    *(pytest.param(m, 4096, 14336, marks=GPU_8B, id=f"llama-8b-m{m}") for m in (1, 16, 256)),
])
def test_fused_norm_and_activation_give_an_fp8_mlp_the_same_inputs(m, hidden, intermediate, triton_path):
    # post_attention_layernorm -> gate_up_proj -> SiLU-and-mul -> down_proj, fused and not.
    dtype = getattr(torch, TRITON_DTYPE)
    gen = torch.Generator().manual_seed(m)

    def weights(*shape: int) -> torch.Tensor:
        return (0.02 * torch.randn(*shape, generator=gen, device="cpu")).to(dtype=dtype, device=DEVICE)

    with torch.device(DEVICE):
        gate_up = online_fp8_linear(weights(2 * intermediate, hidden))
        down = online_fp8_linear(weights(hidden, intermediate))
        norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = 1 + weights(hidden)
    x, residual = 50 * weights(m, hidden), 50 * weights(m, hidden)
    triton_path()

    def mlp(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        norm.fp8_output = fused
        normed, residual_out = norm(x, residual)
        # One 16-bit row is not quantized at all: the FP8 linear takes it to the weight-only GEMV.
        assert isinstance(normed, Fp8Activation) is (fused and kernels.fp8_quantizes_activations(m, dtype))
        return down(SiluAndMul(fp8_output=fused)(gate_up(normed))), residual_out

    (fused_out, fused_residual), (out, residual_out) = mlp(True), mlp(False)
    assert torch.equal(fused_residual, residual_out)
    if DEVICE == "cuda":  # a few activations may be one e4m3 step apart (assert_same_fp8)
        assert float((fused_out.float() - out.float()).norm() / out.float().norm()) < 1e-3
    else:
        assert torch.equal(fused_out, out)
