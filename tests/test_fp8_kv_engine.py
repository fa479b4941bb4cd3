"""--kv-cache-dtype fp8 through the whole engine: sizing, checkpoint scales, and output against references.

The exact reference is transformers with every layer's K (after the rotary)
and V rounded to e4m3 with the same scales, which is what an FP8 cache
stores: the engine's logits must agree with it to fp32 rounding (a value
on an FP8 rounding boundary may round the other way: 1e-3), and greedy tokens
must be equal. Against the unquantized model the difference is the FP8
rounding itself, bounded loosely (the tiny random model has flat logits).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.errors import ModelLoadError
from engine.kv_cache_sizing import cpu_kv_cache_blocks
from engine.layers.quantization.kv_cache import kv_scale_buffers
from engine.model_config import load_model_config
from engine.models.loader import load_model
from engine.startup_report import startup_report
from engine.testing import make_model_folder
from kernels.reference import FP8_DTYPE, dequantize_kv, quantize_kv
from test_models_vs_hf import BLOCK_SIZE, NUM_BLOCKS, run_step, step_metadata

PROMPT = [5, 17, 3, 99, 42, 7, 250, 31, 8, 64, 12, 77, 150, 9, 2, 33, 61, 120, 4, 18]
SAME_ROUNDING = 1e-3  # ‖Δlogits‖ / ‖logits‖ against transformers with the same FP8 rounding
FP8_ROUNDING = 0.1  # … against transformers without it (e4m3: 3 mantissa bits; 0.043 seen)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("dense"), family="llama")


def with_kv_scales(source: Path, dest: Path, scales: dict[str, torch.Tensor]) -> Path:
    """A copy of a model folder with extra KV-scale tensors in their own safetensors file."""
    dest.mkdir()
    for file in source.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    assert not (dest / "model.safetensors.index.json").exists()
    save_file(scales, str(dest / "kv-scales.safetensors"))
    return dest


def per_layer_scales(num_layers: int, k: float, v: float) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value) for i in range(num_layers)
            for name, value in ((f"model.layers.{i}.self_attn.k_scale", k), (f"model.layers.{i}.self_attn.v_scale", v))}


def fp8_rounding_attention(scales: list[tuple[float, float]]):
    """transformers attention over K/V rounded as an FP8 cache stores them; scales: (k, v) of each layer."""

    def round_like_the_cache(x: torch.Tensor, scale: float) -> torch.Tensor:
        return dequantize_kv(quantize_kv(x, FP8_DTYPE, torch.tensor(scale)), x.dtype, torch.tensor(scale))

    def attend(module, query, key, value, *args, **kwargs):
        k_scale, v_scale = scales[module.layer_idx]
        key, value = round_like_the_cache(key, k_scale), round_like_the_cache(value, v_scale)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    return attend


def transformers_model(folder: Path, fp8_scales: tuple[float, float] | list[tuple[float, float]] | None):
    """transformers on the folder; with fp8_scales (one pair for every layer, or one per layer) K/V are FP8-rounded."""
    implementation = "sdpa"
    if fp8_scales is not None:
        num_layers = load_model_config(folder).num_hidden_layers
        per_layer = fp8_scales if isinstance(fp8_scales, list) else [fp8_scales] * num_layers
        implementation = "fp8_kv_" + "_".join(f"{k:.6g}_{v:.6g}" for k, v in per_layer).replace(".", "p")
        AttentionInterface.register(implementation, fp8_rounding_attention(per_layer))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=implementation).eval()


def engine_model(folder: Path, cache_dtype: torch.dtype):
    model = load_model(folder, load_model_config(folder), dtype="float32", device="cpu")
    layers = list(model.attention_layers())
    shape = (NUM_BLOCKS, BLOCK_SIZE, layers[0].num_kv_heads, layers[0].head_dim)
    # Garbage in every slot: a read of a slot not written this test shows up in the logits.
    model.bind_kv_cache([tuple((torch.randn(shape) * 100).to(cache_dtype) for _ in "kv") for _ in layers])
    return model


def engine_prefill_then_decode(model, prompt: list[int]) -> torch.Tensor:
    """Logits of a prefill of all but the last token, then a decode of the last one, through the paged cache."""
    table = [3, 1]
    head = run_step(model, prompt[:-1], list(range(len(prompt) - 1)), step_metadata([(table, 0, len(prompt) - 1)]))
    tail = run_step(model, prompt[-1:], [len(prompt) - 1], step_metadata([(table, len(prompt) - 1, 1)]))
    return torch.cat([head, tail])


def transformers_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).norm() / theirs.norm())


def test_fp8_cache_logits_match_transformers_with_the_same_rounding(source):
    ours = engine_prefill_then_decode(engine_model(source, FP8_DTYPE), PROMPT)
    assert relative_error(ours, transformers_logits(transformers_model(source, (1.0, 1.0)), PROMPT)) < SAME_ROUNDING
    exact = transformers_logits(transformers_model(source, None), PROMPT)
    assert 0 < relative_error(ours, exact) < FP8_ROUNDING


def test_checkpoint_scales_are_loaded_and_used(source, tmp_path):
    num_layers = load_model_config(source).num_hidden_layers
    folder = with_kv_scales(source, tmp_path / "scaled", per_layer_scales(num_layers, 0.37, 0.011))
    model = engine_model(folder, FP8_DTYPE)
    attn = next(model.attention_layers())
    assert (attn.k_scale.item(), attn.v_scale.item()) == pytest.approx((0.37, 0.011))
    ours = engine_prefill_then_decode(model, PROMPT)
    theirs = transformers_logits(transformers_model(folder, (0.37, 0.011)), PROMPT)
    assert relative_error(ours, theirs) < SAME_ROUNDING
    # v_scale 0.011 clamps V at 448 * 0.011 = 4.9: visibly different from scale 1.0.
    assert relative_error(ours, engine_prefill_then_decode(engine_model(source, FP8_DTYPE), PROMPT)) > SAME_ROUNDING


# llm-compressor 0.14.0.1 wrote this FP8_DYNAMIC checkpoint with kv_cache_scheme (static per-tensor FP8,
# calibrated on random ids) from the tiny random Llama (tools/llmcompressor_checkpoints.py fp8-dynamic-kv):
# its model.layers.N.self_attn.k_scale / v_scale are the calibrated scales. transformers ignores them.
LLMCOMPRESSOR_KV = Path(__file__).parent / "fixtures" / "llmcompressor" / "fp8-dynamic-kv"


def test_llmcompressor_kv_cache_scheme_checkpoint(tmp_path):
    pytest.importorskip("compressed_tensors", reason="transformers reads this checkpoint through compressed-tensors")
    from safetensors import safe_open

    with safe_open(str(LLMCOMPRESSOR_KV / "model.safetensors"), "pt") as reader:
        scales = [(float(reader.get_tensor(f"model.layers.{i}.self_attn.k_scale")),
                   float(reader.get_tensor(f"model.layers.{i}.self_attn.v_scale"))) for i in range(2)]
    assert all(0 < scale < 0.1 for pair in scales for scale in pair)  # calibrated, not the default 1.0
    model = engine_model(LLMCOMPRESSOR_KV, FP8_DTYPE)
    loaded = [scale.item() for a in model.attention_layers() for scale in (a.k_scale, a.v_scale)]
    assert loaded == pytest.approx([scale for pair in scales for scale in pair])
    ours = engine_prefill_then_decode(model, PROMPT)
    theirs = transformers_logits(transformers_model(LLMCOMPRESSOR_KV, scales), PROMPT)
    assert relative_error(ours, theirs) < SAME_ROUNDING
    dense_cache = engine_prefill_then_decode(engine_model(LLMCOMPRESSOR_KV, torch.float32), PROMPT)
    assert 0 < relative_error(ours, dense_cache) < FP8_ROUNDING


@pytest.mark.parametrize(("suffix", "buffers"), [
    ("self_attn.kv_scale", ["k_scale", "v_scale"]),
    ("self_attn.k_proj.output_scale", ["k_scale"]),
    ("self_attn.v_proj.v_scale", ["v_scale"]),
    ("self_attn.q_scale", None),
    ("self_attn.k_proj.weight_scale", None),
])
def test_checkpoint_kv_scale_names(suffix, buffers):
    expected = None if buffers is None else [f"model.layers.3.self_attn.attn.{b}" for b in buffers]
    assert kv_scale_buffers(f"model.layers.3.self_attn.{suffix.removeprefix('self_attn.')}") == expected


def test_per_head_scales_become_their_maximum_and_bad_ones_name_the_tensor(source, tmp_path):
    name = "model.layers.1.self_attn.kv_scale"
    folder = with_kv_scales(source, tmp_path / "per-head", {name: torch.tensor([0.5, 2.0])})
    model = engine_model(folder, FP8_DTYPE)
    attn = list(model.attention_layers())[1]
    assert (attn.k_scale.item(), attn.v_scale.item()) == (2.0, 2.0)
    bad = with_kv_scales(source, tmp_path / "bad", {name: torch.tensor(-1.0)})
    with pytest.raises(ModelLoadError, match=name):
        engine_model(bad, FP8_DTYPE)


def test_fp8_cache_takes_one_byte_per_value_and_the_report_says_so(source):
    def core(kv_cache_dtype: str) -> EngineCore:
        return EngineCore(EngineConfig(model=str(source), device="cpu", dtype="float32", num_kv_blocks=8,
                                       kv_cache_dtype=kv_cache_dtype))

    auto, fp8 = core("auto"), core("fp8_e4m3")
    assert fp8.model_runner.kv_cache.dtype == FP8_DTYPE and auto.model_runner.kv_cache.dtype == torch.float32
    assert fp8.model_runner.bytes_per_block * 4 == auto.model_runner.bytes_per_block
    report = startup_report(fp8, EngineConfig(model=str(source)), None)
    assert report.kv_cache_dtype == "float8_e4m3fn" and "float8_e4m3fn" in report.text()
    assert startup_report(auto, EngineConfig(model=str(source)), None).kv_cache_dtype == "float32"


def test_the_same_memory_holds_twice_the_blocks_of_a_bfloat16_cache():
    bf16_block = 2 * 24 * 16 * 8 * 128 * 2  # K and V, 24 layers, 16 tokens, 8 KV heads of 128, 2 bytes
    memory, weights = 64 * 2**30, 3 * 2**30  # the weights cap the cache: 3 GiB of it
    bf16 = cpu_kv_cache_blocks(256, 32768, 16, bf16_block, weights, memory)
    fp8 = cpu_kv_cache_blocks(256, 32768, 16, bf16_block // 2, weights, memory)
    assert fp8 == 2 * bf16


def test_llm_greedy_tokens_match_transformers_with_the_same_rounding(source):
    llm = LLM(model=str(source), device="cpu", dtype="float32", num_kv_blocks=64, kv_cache_dtype="fp8")
    prompts = [PROMPT[:n] for n in (3, 11, 20)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    model = transformers_model(source, (1.0, 1.0))
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        for prompt, output in zip(prompts, outputs):
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
            assert output.outputs[0].token_ids == expected[0, len(prompt):].tolist()


def test_kv_cache_dtype_is_validated(source):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3"):
        EngineConfig(model=str(source), kv_cache_dtype="fp8_e5m2")


# ---- GPU: bf16 model, Triton kernels, CUDA graphs --------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_cache_on_the_gpu_doubles_blocks_and_stays_close(tmp_path):
    folder = make_model_folder(tmp_path / "model", family="llama", size="tiny", dtype=torch.bfloat16)
    prompts = [[(7 * i + 3 * j) % 500 + 1 for j in range(40 + 13 * i)] for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=5)
    runs = {}
    for kv_cache_dtype in ("auto", "fp8"):
        llm = LLM(model=str(folder), dtype="bfloat16", gpu_memory_utilization=0.3, kv_cache_dtype=kv_cache_dtype)
        runs[kv_cache_dtype] = (llm.llm_engine.core.model_runner.num_kv_blocks,
                                llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
        del llm
        torch.cuda.empty_cache()
    (auto_blocks, auto_out), (fp8_blocks, fp8_out) = runs["auto"], runs["fp8"]
    assert fp8_blocks >= 1.9 * auto_blocks
    # The first token's top-5 log-probabilities (prefill through the cache): FP8 rounding moves them a little.
    for a, b in zip(auto_out, fp8_out):
        top_a, top_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        for token in top_a.keys() & top_b.keys():
            assert abs(top_a[token] - top_b[token]) < 0.3
    first_equal = sum(a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0] for a, b in zip(auto_out, fp8_out))
    assert first_equal >= 6, f"only {first_equal}/8 first greedy tokens agree"
