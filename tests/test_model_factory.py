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

from engine.model_config import load_model_config, parse_model_config
from engine.testing import DEFAULT_SERVED_NAME, default_model_path, make_model_folder
from engine.testing.factory import checkpoint_shapes, write_model_metadata

FAMILIES = ["llama", "qwen2", "mistral"]


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
    # transformers' Qwen2Tokenizer normalises to NFC, as the real Qwen2 tokenizer does.
    expected = unicodedata.normalize("NFC", text) if family == "qwen2" else text
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
    ],
)
def test_chat_template_renders(tokenizers, family, expected):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    rendered = tokenizers[family].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == expected


@pytest.mark.parametrize(
    ("family", "stop_tokens"),
    [("llama", ["<|end_of_text|>", "<|eot_id|>"]), ("qwen2", ["<|im_end|>", "<|endoftext|>"]), ("mistral", ["</s>"])],
)
def test_generation_config_eos_are_the_stop_tokens(folders, tokenizers, family, stop_tokens):
    ids = tokenizers[family].convert_tokens_to_ids(stop_tokens)
    generation = json.loads((folders[family] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ids
    assert load_model_config(folders[family]).eos_token_ids == tuple(ids)


def test_family_differences_reach_the_model_config(folders):
    llama, qwen2, mistral = (load_model_config(folders[family]) for family in FAMILIES)
    assert (llama.rope.rope_type, llama.qkv_bias, llama.tie_word_embeddings) == ("llama3", False, False)
    assert (qwen2.architecture, qwen2.qkv_bias, qwen2.o_proj_bias, qwen2.tie_word_embeddings) == (
        "Qwen2ForCausalLM", True, False, True)
    assert (mistral.sliding_window, mistral.head_dim, mistral.num_key_value_heads) == (None, 32, 2)
    assert llama.vocab_size == 512 and llama.dtype == torch.float32


def test_classic_config_reads_like_the_transformers5_one(tmp_path):
    modern = write_model_metadata(tmp_path / "modern", "llama", "llama-3.1-8b", torch.bfloat16)
    classic = write_model_metadata(tmp_path / "classic", "llama", "llama-3.1-8b", torch.bfloat16, classic_config=True)
    raw = json.loads((classic.path / "config.json").read_text())
    assert raw["torch_dtype"] == "bfloat16" and raw["rope_theta"] == 500000.0
    assert raw["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in raw and "dtype" not in raw
    assert dataclasses.replace(classic, path=modern.path) == modern


def test_mistral_v01_sliding_window_caps_the_context():
    raw = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
           "num_hidden_layers": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
           "max_position_embeddings": 32768, "sliding_window": 4096, "rope_theta": 10000.0,
           "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
    config = parse_model_config(raw, {}, Path("/models/mistral-7b-v0.1"))
    assert (config.sliding_window, config.max_model_len, config.head_dim) == (4096, 4096, 128)
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1


# Published parameter counts of the real models whose shapes the factory copies.
@pytest.mark.parametrize(
    ("family", "size", "parameters"),
    [
        ("llama", "llama-3.2-1b", 1_235_814_400),
        ("llama", "llama-3.1-8b", 8_030_261_248),
        ("llama", "llama-3.1-70b", 70_553_706_496),
        ("qwen2", "qwen2.5-0.5b", 494_032_768),
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
