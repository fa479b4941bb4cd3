"""engine.testing builds deterministic, loadable Hugging Face model folders."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoTokenizer

from engine.errors import UnsupportedModelError
from engine.model_config import MoeConfig, RopeConfig, load_model_config, parse_model_config
from engine.testing import DEFAULT_SERVED_NAME, default_model_path, make_model_folder
from engine.testing.factory import checkpoint_shapes, write_model_metadata

FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "mixtral", "gemma3"]


def tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as reader:
        return {name: reader.get_tensor(name) for name in reader.keys()}


@pytest.fixture(scope="module")
def folders(tiny_model_folder):
    return {family: tiny_model_folder(family) for family in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(folders):
    return {family: AutoTokenizer.from_pretrained(folder) for family, folder in folders.items()}


def test_folder_holds_the_hugging_face_files(folders):
    for folder in folders.values():
        names = {path.name for path in folder.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} <= names


def test_same_seed_same_tensors_other_seed_other_tensors(folders, tmp_path):
    again = tensors(make_model_folder(tmp_path / "again", family="llama"))
    other = tensors(make_model_folder(tmp_path / "other", family="llama", seed=1))
    first = tensors(folders["llama"])
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_multibyte_text(tokenizers, family):
    tokenizer = tokenizers[family]
    text = "Grüße, 日本語, Здравствуйте, naïve — 🙂🚀👩‍👩‍👧 and \t tabs \n newlines"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned, not just bytes
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40))
def test_tokenizer_round_trips_any_unicode(tokenizers, family, text):
    tokenizer = tokenizers[family]
    # transformers' Qwen2Tokenizer normalises to NFC, as the real Qwen2 tokenizer does; which class
    # transformers picks follows config.json's model_type (qwen2 gets it, qwen3_moe does not).
    normalises = type(tokenizer).__name__ == "Qwen2Tokenizer"
    expected = unicodedata.normalize("NFC", text) if normalises else text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == expected


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("llama", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi 🙂<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n"),
        ("qwen2", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
                  "<|im_start|>assistant\n"),
        ("mistral", "<s>Be brief.\n\n[INST] Hi 🙂 [/INST]"),
        ("gemma3", "<bos><start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi 🙂<end_of_turn>\n"
                   "<start_of_turn>model\n"),
    ],
)
def test_chat_template_renders(tokenizers, family, expected):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    rendered = tokenizers[family].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected


@pytest.mark.parametrize(
    ("family", "stop_tokens"),
    [("llama", ["<|end_of_text|>", "<|eot_id|>"]), ("qwen2", ["<|im_end|>", "<|endoftext|>"]), ("mistral", ["</s>"]),
     ("qwen3", ["<|im_end|>", "<|endoftext|>"]), ("mixtral", ["</s>"]), ("gemma3", ["<eos>", "<end_of_turn>"])],
)
def test_generation_config_eos_are_the_stop_tokens(folders, tokenizers, family, stop_tokens):
    ids = tokenizers[family].convert_tokens_to_ids(stop_tokens)
    generation = json.loads((folders[family] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids
    assert load_model_config(folders[family]).eos_token_ids == tuple(ids)


def test_family_differences_reach_the_model_config(folders):
    llama, qwen2, mistral, qwen3, qwen3_moe, mixtral, gemma3 = (load_model_config(folders[f]) for f in FAMILIES)
    assert (llama.rope.rope_type, llama.qkv_bias, llama.tie_word_embeddings) == ("llama3", False, False)
    assert (qwen2.architecture, qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.tie_word_embeddings) == (
        "Qwen2ForCausalLM", True, False, True)
    assert (mistral.sliding_window, mistral.head_dim, mistral.num_key_value_heads) == (None, 32, 2)
    assert llama.vocab_size == 512 and llama.dtype == torch.float32
    assert (qwen3.qk_norm, qwen3.qkv_bias, qwen3.moe, llama.qk_norm) == (True, False, None, False)
    assert qwen3_moe.moe == MoeConfig(num_experts=8, top_k=2, intermediate_size=32, norm_topk_prob=True,
                                      sparse_layers=(True, False))
    assert mixtral.moe == MoeConfig(num_experts=4, top_k=2, intermediate_size=64, norm_topk_prob=True,
                                    sparse_layers=(True, True))
    assert (gemma3.layer_windows, gemma3.hidden_act, gemma3.attention_scale) == ((8, 8, None), "gelu_pytorch_tanh",
                                                                                 24**-0.5)
    assert (gemma3.rope.rope_type, gemma3.rope.factor, gemma3.rope.theta) == ("linear", 8.0, 1e6)
    assert gemma3.local_rope == RopeConfig(theta=1e4)


def test_classic_config_reads_like_the_transformers5_one(tmp_path):
    modern = write_model_metadata(tmp_path / "modern", "llama", "llama-3.1-8b", torch.bfloat16)
    classic = write_model_metadata(tmp_path / "classic", "llama", "llama-3.1-8b", torch.bfloat16, classic_config=True)
    raw = json.loads((classic.path / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and raw["rope_theta"] == 500000.0
    assert raw["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in raw and "dtype" not in raw
    assert dataclasses.replace(classic, path=modern.path) == modern


def test_mistral_v01_serves_its_full_context_with_a_window_on_every_layer():
    raw = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
           "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    config = parse_model_config(raw, {}, Path("/models/mistral-7b-v0.1"))
    assert (config.sliding_window, config.max_model_len, config.head_dim) == (4096, 32768, 128)
    assert config.layer_windows == (4096,) * 32
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1


GEMMA3_1B_CLASSIC = {  # google/gemma-3-1b-it's config.json as published (classic keys, no layer_types)
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "vocab_size": 262144,
    "torch_dtype": "bfloat16", "attn_logit_softcapping": None, "final_logit_softcapping": None,
}


def test_gemma3_classic_config_interleaves_five_local_layers_per_global_one():
    config = parse_model_config(GEMMA3_1B_CLASSIC, {}, Path("/models/gemma-3-1b-it"))
    assert config.layer_windows == tuple(None if (i + 1) % 6 == 0 else 512 for i in range(26))
    assert (config.rope.theta, config.rope.rope_type, config.local_rope) == (1e6, "default", RopeConfig(theta=1e4))
    assert (config.attention_scale, config.qk_norm, config.max_model_len) == (1 / 16, True, 32768)
    scaled = parse_model_config({**GEMMA3_1B_CLASSIC, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}, {},
                                Path("/models/gemma-3-4b"))
    assert (scaled.rope.rope_type, scaled.rope.factor, scaled.rope.theta) == ("linear", 8.0, 1e6)
    assert scaled.local_rope == RopeConfig(theta=1e4)  # local layers are never scaled


@pytest.mark.parametrize(
    ("change", "message"),
    [({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping is not supported"),
     ({"hidden_activation": "relu"}, "activation 'relu' is not supported")],
)
def test_gemma3_features_kubellm_lacks_are_refused_by_name(change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        parse_model_config({**GEMMA3_1B_CLASSIC, **change}, {}, Path("/models/gemma"))


def test_qwen3_moe_dense_layers_follow_mlp_only_layers_and_sparse_step():
    raw = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
           "num_hidden_layers": 4, "intermediate_size": 128, "vocab_size": 32, "num_experts": 8,
           "num_experts_per_tok": 2, "moe_intermediate_size": 16, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    moe = parse_model_config(raw, {}, Path("/m")).moe
    assert (moe.sparse_layers, moe.norm_topk_prob, moe.intermediate_size) == ((False, True, False, False), False, 16)


# Published parameter counts of the real models whose shapes the factory copies.
@pytest.mark.parametrize(
    ("family", "size", "parameters"),
    [
        ("llama", "llama-3.2-1b", 1_235_814_400),
        ("llama", "llama-3.1-8b", 8_030_261_248),
        ("llama", "llama-3.1-70b", 70_553_706_496),
        ("qwen2", "qwen2.5-0.5b", 494_032_768),
        ("qwen3", "qwen3-8b", 8_190_735_360),
        ("qwen3_moe", "qwen3-30b-a3b", 30_532_122_624),
        ("mixtral", "mixtral-8x7b", 46_702_792_704),
        ("gemma3", "gemma-3-270m", 268_098_176),
    ],
)
def test_real_shapes_have_the_published_parameter_counts(tmp_path, family, size, parameters):
    config = write_model_metadata(tmp_path, family, size, torch.bfloat16)
    total = sum(torch.Size(shape).numel() for shape in checkpoint_shapes(config).values())
    assert total == parameters
    assert config.dtype == torch.bfloat16


def test_unknown_family_or_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'gpt2'"):
        make_model_folder(tmp_path, family="gpt2")
    with pytest.raises(ValueError, match="no 'qwen2.5-0.5b' shape for family 'llama'"):
        make_model_folder(tmp_path, family="llama", size="qwen2.5-0.5b")


def test_default_model_is_built_once_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBELLM_CACHE_DIR", str(tmp_path))
    path = default_model_path()
    assert path.is_relative_to(tmp_path) and (path / "model.safetensors").is_file()
    built_at = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == built_at
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind
    assert DEFAULT_SERVED_NAME == "kubellm-default"
