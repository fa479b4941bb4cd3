"""Quantized checkpoints load and run: engine logits against transformers on the dequantized weights.

Each format's checkpoint is dequantized here by code that follows that
project's own published dequantization (AutoAWQ's reverse packing order,
AutoGPTQ's z - 1 zeros, compressed-tensors' own decompressor), independently
of the engine's loader, and written as a dense folder for transformers. W4A16
logits must then agree to fp32 rounding; FP8 ones to the error of quantizing
activations per token, which the dense reference does not do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from benchmarks.perplexity_reference import dequantize_awq_gemm, dequantize_gptq
from engine.errors import UnsupportedModelError
from engine.layers.quantization.config import linear_method_for
from engine.model_config import load_model_config
from engine.models.loader import load_model
from engine.testing import make_model_folder
from engine.testing.quantized import LINEAR_NAMES, QUANTIZED_FORMATS, quantize_model_folder
from test_models_vs_hf import allocate_cache, run_step, step_metadata

GROUP_SIZE = 32  # the tiny model's 64 hidden features hold two groups
PROMPT = [5, 17, 3, 99, 42, 7, 250, 31, 8, 64, 12, 77, 150, 9, 2, 33, 61, 120, 4, 18]
# ‖Δlogits‖ / ‖logits‖ on the same weights, fp32 on both sides. With FP8 activations both sides round
# the same values to FP8, but a 1e-7 difference can move one across a rounding boundary: 1e-3 there.
TOLERANCE = {"w4": 1e-4, "fp8": 1e-3}
QUANTIZATION_ERROR = 0.2  # 8-bit weights and activations against 32-bit ones on a random tiny model


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("dense"), family="llama")


def engine_logits(folder: Path, quantization: str | None = None) -> torch.Tensor:
    model = load_model(folder, load_model_config(folder), dtype="float32", device="cpu", quantization=quantization)
    allocate_cache(model)
    positions = list(range(len(PROMPT)))
    return run_step(model, PROMPT, positions, step_metadata([([3, 1], 0, len(PROMPT))]))


def transformers_logits(folder: Path, fp8_activations: bool = False) -> torch.Tensor:
    """transformers' logits; fp8_activations rounds every decoder linear layer's input to FP8 per token first."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if fp8_activations:
        round_linear_inputs_to_fp8(model)
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].float()


def round_linear_inputs_to_fp8(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEAR_NAMES:
            module.register_forward_pre_hook(lambda module, args: (fp8_round_per_token(args[0]),))


def fp8_round_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
    return (x / scale).to(torch.float8_e4m3fn).float() * scale


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


# --- the projects' dequantization, written from their published code ---------------------------------


def dequantize_awq(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    return dequantize_awq_gemm(t["qweight"], t["qzeros"], t["scales"], group)  # the accuracy table's reference


def dequantize_compressed_tensors(t: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    scheme = QuantizationScheme(**config["config_groups"]["group_0"])
    return PackedQuantizationCompressor.decompress(dict(t), scheme)["weight"].float()


def dequantize_fp8(t: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    return t["weight"].float() * t["weight_scale"].float().reshape(-1, 1)


def dequantized_folder(quantized: Path, target: Path, fmt: str) -> Path:
    """A dense copy of a quantized folder (config without quantization_config) for transformers."""
    config = json.loads((quantized / "config.json").read_text())
    quant_config = config.pop("quantization_config")
    shutil.copytree(quantized, target, ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    (target / "config.json").write_text(json.dumps(config))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(quantized.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})
    dense: dict[str, torch.Tensor] = {}
    modules = {name.rsplit(".", 1)[0] for name in tensors if name.rsplit(".", 2)[-2] in LINEAR_NAMES}
    for module in modules:
        parts = {name[len(module) + 1:]: tensors.pop(name) for name in list(tensors) if name.startswith(module + ".")}
        if fmt == "awq":
            dense[module + ".weight"] = dequantize_awq(parts, GROUP_SIZE)
        elif fmt.startswith("gptq"):
            dense[module + ".weight"] = dequantize_gptq(*(parts[k] for k in ("qweight", "qzeros", "scales", "g_idx")))
        elif fmt == "compressed-tensors":
            dense[module + ".weight"] = dequantize_compressed_tensors(parts, quant_config)
        else:
            dense[module + ".weight"] = dequantize_fp8(parts, GROUP_SIZE)
    dense.update({name: tensor.float() for name, tensor in tensors.items()})
    save_file({name: t.contiguous() for name, t in dense.items()}, str(target / "model.safetensors"))
    return target


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
def test_quantized_checkpoint_matches_transformers_on_its_dequantized_weights(fmt, source, tmp_path):
    quantized = quantize_model_folder(source, tmp_path / "quantized", fmt, group_size=GROUP_SIZE)
    dense = dequantized_folder(quantized, tmp_path / "dense", fmt)
    ours = engine_logits(quantized)
    fp8 = fmt.startswith("fp8")
    assert relative_error(ours, transformers_logits(dense, fp8_activations=fp8)) < TOLERANCE["fp8" if fp8 else "w4"]
    assert relative_error(ours, transformers_logits(source)) > 1e-2  # the weights really were quantized


@pytest.mark.parametrize("group_size,zero_point", [(-1, True), (GROUP_SIZE, False), (-1, False)])
def test_compressed_tensors_w4a16_variants(group_size, zero_point, source, tmp_path):
    quantized = quantize_model_folder(source, tmp_path / "q", "compressed-tensors", group_size, zero_point)
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is not zero_point
    reference = transformers_logits(dequantized_folder(quantized, tmp_path / "dense", "compressed-tensors"))
    assert relative_error(engine_logits(quantized), reference) < TOLERANCE["w4"]


def test_online_fp8_quantizes_a_dense_checkpoint_while_loading(source, tmp_path):
    model = load_model(source, load_model_config(source), dtype="float32", device="cpu", quantization="fp8")
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.weight.shape[0],)
    # The reference: every linear weight rounded to FP8 with one scale per output row, by torch's own cast.
    reference = shutil.copytree(source, tmp_path / "fp8-rounded")
    file = reference / "model.safetensors"
    with safe_open(str(file), framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    for name, tensor in tensors.items():
        if name.rsplit(".", 2)[-2] in LINEAR_NAMES:
            tensors[name] = fp8_round_per_token(tensor)  # a weight's rows are its output channels
    save_file(tensors, str(file))
    ours = engine_logits(source, quantization="fp8")
    assert relative_error(ours, transformers_logits(reference, fp8_activations=True)) < TOLERANCE["fp8"]
    assert 1e-2 < relative_error(ours, transformers_logits(source)) < QUANTIZATION_ERROR


# --- checkpoints written by llm-compressor itself ----------------------------------------------------
# tests/fixtures/llmcompressor holds checkpoints that llm-compressor 0.14.0.1 (compressed-tensors 0.19.0,
# torch 2.13 CPU) wrote from the tiny random Llama of make_model_folder(family="llama", seed=0) with
# tools/llmcompressor_checkpoints.py; recipe.yaml beside each is llm-compressor's own record of the recipe.
LLMCOMPRESSOR = Path(__file__).parent / "fixtures" / "llmcompressor"


# gptq-w4a16-static: GPTQModifier's defaults (symmetric, actorder "static", compressed-tensors' alias of
# "weight"), group 32, calibrated on benchmarks/data/calibration_gettysburg_and_novels.txt.
@pytest.mark.parametrize("name", ["fp8-dynamic", "w4a16", "gptq-w4a16-static"])
def test_llmcompressor_checkpoint_matches_transformers_loading_it(name):
    # transformers decompresses these through compressed-tensors (and rounds FP8 activations itself).
    folder = LLMCOMPRESSOR / name
    assert relative_error(engine_logits(folder), transformers_logits(folder)) < TOLERANCE["w4"]


@pytest.mark.parametrize(("actorder", "g_idx"), [
    (None, False), ("weight", False), ("static", False), ("group", True), ("dynamic", True), (True, True),
])
def test_compressed_tensors_actorder_aliases(actorder, g_idx):
    # compressed-tensors names "static" an alias of "weight" and "dynamic" one of "group" (True: older form).
    weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
               "actorder": actorder}
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    assert linear_method_for(None, config, "config.json").scheme.act_order is g_idx


def test_llmcompressor_gptq_with_zero_points_matches_its_own_decompression(tmp_path):
    # transformers 5.23 with compressed-tensors 0.20 cannot load packed zero points (it expects them
    # unpacked: "ckpt [8, 2] vs model [64, 2]"), so the reference is compressed-tensors' decompressor.
    folder = LLMCOMPRESSOR / "gptq-asym-actorder-weight"
    reference = transformers_logits(dequantized_folder(folder, tmp_path / "dense", "compressed-tensors"))
    assert relative_error(engine_logits(folder), reference) < TOLERANCE["w4"]


def test_autoawq_checkpoint_matches_its_dequantized_weights(tmp_path):
    # tests/fixtures/autoawq/gemm-g32: AutoAWQ 0.2.9 (torch 2.13 CPU) quantized the same tiny Llama with
    # tools/autoawq_checkpoint.py. The reference's unpacker also matched AutoAWQ's own dequantize_gemm (14 of
    # 14 layers equal in fp16, AutoAWQ's dtype); that check needs autoawq installed, so it was run by hand.
    folder = Path(__file__).parent / "fixtures" / "autoawq" / "gemm-g32"
    reference = transformers_logits(dequantized_folder(folder, tmp_path / "dense", "awq"))
    assert relative_error(engine_logits(folder), reference) < TOLERANCE["w4"]


# tests/fixtures/autogptq: AutoGPTQ 0.7.1 (transformers 4.51.3, torch 2.13 CPU) quantized the same tiny Llama with
# tools/autogptq_checkpoint.py (float16, symmetric, group 32, calibrated on calibration_gettysburg_and_novels.txt),
# act order off and on; the folders hold what its save_quantized wrote, tokenizer files left out. dequantize_gptq
# equals AutoGPTQ's own dequantization of the packed tensors (qlinear_cuda.QuantLinear's torch path, g_idx and
# all) exactly, 14 of 14 layers in both; that check needs auto-gptq installed, so it was run by hand.
# transformers 5 loads GPTQ only through gptqmodel's kernels, so the reference is dequantize_gptq through
# transformers' dense Llama.
AUTOGPTQ = Path(__file__).parent / "fixtures" / "autogptq"


@pytest.mark.parametrize(("name", "desc_act"), [("g32", False), ("g32-desc-act", True)])
def test_autogptq_checkpoint_matches_its_dequantized_weights(name, desc_act, source, tmp_path):
    folder = AUTOGPTQ / name
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config == json.loads((folder / "quantize_config.json").read_text())
    written = {key: config[key] for key in ("quant_method", "bits", "group_size", "sym", "desc_act", "static_groups")}
    assert written == {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "sym": True,
                       "desc_act": desc_act, "static_groups": False}
    # 0.7.1 writes no checkpoint_format (the field came later; absent means "gptq": zeros stored as z - 1).
    assert "checkpoint_format" not in config and config["is_marlin_format"] is False
    with safe_open(str(folder / "gptq_model-4bit-32g.safetensors"), framework="pt") as reader:
        g_idx = reader.get_tensor("model.layers.0.mlp.down_proj.g_idx")
        # AutoGPTQ writes a bias for every quantized layer; the Llama has none, so the engine skips them: all zero.
        assert all(not reader.get_tensor(key).any() for key in reader.keys() if key.endswith(".bias"))
    assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // GROUP_SIZE) is not desc_act
    ours = engine_logits(folder)
    reference = transformers_logits(dequantized_folder(folder, tmp_path / "dense", "gptq"))
    assert relative_error(ours, reference) < TOLERANCE["w4"]
    assert relative_error(ours, transformers_logits(source)) > 1e-2  # the weights really were quantized


# --- what is refused, and how ------------------------------------------------------------------------


def with_quantization_config(source: Path, target: Path, quantization_config: dict) -> Path:
    folder = shutil.copytree(source, target)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("quantization_config", "fragments"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, ["bitsandbytes", "supported: fp8"]),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, ["gptq with 8 bits", "supported:"]),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, ["AWQ version 'gemv'"]),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, ["block-wise", "[128, 128]"]),
        ({"quant_method": "gptq", "bits": 4, "group_size": 100}, ["group_size 100"]),
        ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"},
                                                                        "format": "int-quantized"}}},
         ["int weights", "8 bits"]),
        ({"quant_method": "compressed-tensors", "ignore": ["re:.*down_proj"],
          "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
                                  "format": "pack-quantized"}}},
         ["model.layers.0.mlp.down_proj unquantized"]),
    ],
)
def test_unsupported_quantization_is_refused_naming_method_and_bits(quantization_config, fragments, source, tmp_path):
    folder = with_quantization_config(source, tmp_path / "model", quantization_config)
    with pytest.raises(UnsupportedModelError) as refused:
        engine_logits(folder)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_flag_must_agree_with_the_checkpoint(source, tmp_path):
    folder = quantize_model_folder(source, tmp_path / "awq", "awq", group_size=GROUP_SIZE)
    with pytest.raises(UnsupportedModelError, match="--quantization gptq contradicts .*'awq'"):
        engine_logits(folder, quantization="gptq")
    with pytest.raises(UnsupportedModelError, match="--quantization awq needs a awq checkpoint"):
        engine_logits(source, quantization="awq")


@pytest.mark.parametrize("fmt", ["awq", "gptq-act-order", "fp8-channel"])
def test_llm_greedy_text_matches_transformers_on_the_dequantized_weights(fmt, source, tmp_path):
    # The whole engine (scheduler, paged cache, sampler) on a checkpoint detected from config.json alone.
    from engine import LLM, SamplingParams

    quantized = quantize_model_folder(source, tmp_path / "quantized", fmt, group_size=GROUP_SIZE)
    dense = dequantized_folder(quantized, tmp_path / "dense", fmt)
    llm = LLM(model=str(quantized), device="cpu", dtype="float32", num_kv_blocks=64)
    prompts = [PROMPT[:n] for n in (3, 11, 20)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    if fmt.startswith("fp8"):
        round_linear_inputs_to_fp8(model)
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
            assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()
