"""Model folders that cannot load fail with a ModelLoadError naming the file or tensor at fault."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.layers.embedding import ParallelLMHead
from engine.layers.linear import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.weights import ShapeMismatchError
from engine.model_config import SUPPORTED_ARCHITECTURES, load_model_config
from engine.models.loader import load_model
from engine.models.registry import MODEL_REGISTRY
from engine.testing import make_model_folder


@pytest.fixture(scope="module")
def pristine(tiny_model_folder):
    return tiny_model_folder("qwen2")


@pytest.fixture
def folder(pristine, tmp_path):
    """A private copy each test may break."""
    return shutil.copytree(pristine, tmp_path / "model")


def load(folder):
    return load_model(folder, load_model_config(folder), dtype="float32", device="cpu")


def rewrite_checkpoint(file, change):
    with safe_open(str(file), framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
    change(tensors)
    save_file(tensors, str(file))


def test_registry_covers_every_supported_architecture():
    assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_config(tmp_path / "nowhere")


def test_missing_config_json(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json is missing"):
        load_model_config(folder)


def test_invalid_config_json(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model_config(folder)


def test_unsupported_architecture_lists_supported_ones(folder):
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model_config(folder)


def test_unsupported_rope_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        load_model_config(folder)


def test_no_safetensors(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors files in"):
        load(folder)


def test_truncated_safetensors_names_the_file(folder):
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is not a readable safetensors file"):
        load(folder)


def test_missing_tensor_is_named(folder):
    rewrite_checkpoint(folder / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError, match=r"missing 1 tensor\(s\): model.layers.1.self_attn.k_proj.bias"):
        load(folder)


def test_shape_mismatch_names_tensor_and_shapes(folder):
    def shrink(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:-1]

    rewrite_checkpoint(folder / "model.safetensors", shrink)
    with pytest.raises(ModelLoadError, match=r"model.layers.0.mlp.up_proj.weight has shape \[127, 64\].*\[128, 64\]"):
        load(folder)


def test_extra_tensors_are_ignored(folder):
    def add_inv_freq(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    rewrite_checkpoint(folder / "model.safetensors", add_inv_freq)
    load(folder)


def test_sharded_folder_loads_the_same_weights(tmp_path, pristine):
    sharded = make_model_folder(tmp_path / "sharded", family="qwen2", shards=3)
    assert len(list(sharded.glob("model-0000?-of-00003.safetensors"))) == 3
    single, split = load(pristine), load(sharded)
    for (name, a), (_, b) in zip(single.state_dict().items(), split.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_index_pointing_to_missing_shard(tmp_path):
    sharded = make_model_folder(tmp_path / "sharded", family="llama", shards=2)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors.index.json names shard.*model-00002-of-00002"):
        load(sharded)


def test_tied_embeddings_share_the_embedding(pristine):
    model = load(pristine)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_auto_keeps_a_float32_checkpoint_on_cpu_and_explicit_dtypes_are_honoured(pristine):
    config = load_model_config(pristine)
    assert load_model(pristine, config, dtype="auto").lm_head.weight.dtype == torch.float32
    bf16 = load_model(pristine, config, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.model.rotary_emb.cos_sin_cache.dtype == torch.float32


# Tensor-parallel slicing: each rank must take exactly its rows/columns of a checkpoint tensor.
def load_rank(layer_class, full: torch.Tensor, rank: int, size: int, *args, shard_id=None, **kwargs):
    layer = layer_class(*args, tp_rank=rank, tp_size=size, **kwargs)
    layer.weight.weight_loader(layer.weight, full, shard_id)
    return layer.weight.data


def test_column_and_row_parallel_shards_concatenate_to_the_full_weight():
    full = torch.randn(8, 6)
    columns = [load_rank(ColumnParallelLinear, full, r, 2, 6, 8) for r in range(2)]
    rows = [load_rank(RowParallelLinear, full, r, 2, 6, 8) for r in range(2)]
    assert torch.equal(torch.cat(columns, dim=0), full)
    assert torch.equal(torch.cat(rows, dim=1), full)


def test_merged_gate_up_rank_holds_its_slice_of_each():
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    layer = MergedColumnParallelLinear(4, [8, 8], tp_rank=1, tp_size=2)
    layer.weight.weight_loader(layer.weight, gate, 0)
    layer.weight.weight_loader(layer.weight, up, 1)
    assert torch.equal(layer.weight.data, torch.cat([gate[4:], up[4:]]))


def test_qkv_replicates_kv_heads_when_there_are_fewer_than_ranks():
    head_dim, hidden = 2, 4
    q, k, v = torch.randn(8 * head_dim, hidden), torch.randn(2 * head_dim, hidden), torch.randn(2 * head_dim, hidden)
    for rank in range(4):  # 8 query heads, 2 KV heads, 4 ranks: ranks 0-1 share KV head 0, ranks 2-3 KV head 1
        layer = QKVParallelLinear(hidden, head_dim, 8, 2, tp_rank=rank, tp_size=4)
        for shard_id, tensor in zip("qkv", (q, k, v)):
            layer.weight.weight_loader(layer.weight, tensor, shard_id)
        kv_head = rank // 2
        expected = torch.cat([q[rank * 4 : rank * 4 + 4], k[kv_head * 2 : kv_head * 2 + 2], v[kv_head * 2 : kv_head * 2 + 2]])
        assert torch.equal(layer.weight.data, expected), rank


def test_vocab_rows_split_with_zero_padding_on_the_last_rank():
    full = torch.randn(10, 3)
    shards = [load_rank(ParallelLMHead, full, r, 4, 10, 3) for r in range(4)]
    assert [s.shape[0] for s in shards] == [3, 3, 3, 3]
    assert torch.equal(torch.cat(shards)[:10], full) and not shards[3][1:].any()


def test_parallel_loaders_check_the_full_checkpoint_shape():
    with pytest.raises(ShapeMismatchError, match=r"expected shape \[8, 6\], got \[4, 6\]"):
        load_rank(ColumnParallelLinear, torch.randn(4, 6), 0, 2, 6, 8)
