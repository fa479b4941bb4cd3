"""Build real Hugging Face model folders locally: config, random safetensors weights, tokenizer.

Weights are seeded per tensor (from the seed and the tensor's name), so a folder
is identical however it is sharded and whatever else was built before it.
Tensors are drawn with std 1/sqrt(fan_in), which keeps activations and logits
of order one: random models then have clear greedy choices, so tests comparing
them against transformers are not decided by noise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
from transformers import GenerationConfig

from engine.cache_dir import cache_dir
from engine.model_config import DTYPES, ModelConfig, load_model_config
from engine.models.llama import MLP_MODULE_NAME
from engine.models.registry import MODEL_REGISTRY
from engine.testing.safetensors_stream import write_safetensors
from engine.testing.shapes import FAMILIES, shape_kwargs
from engine.testing.tokenizer import CHAT_FORMATS, write_tokenizer

DEFAULT_SERVED_NAME = "kubellm-default"
_DEFAULT_MODEL_DIR = "kubellm-default-llama-tiny-v1"  # bump when the factory's output changes


def make_model_folder(
    path: str | Path,
    family: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    shards: int = 1,
    classic_config: bool = False,
) -> Path:
    """Write a complete model folder at `path` and return it.

    dtype: storage dtype; None means float32 for tiny shapes, bfloat16 for real ones.
    classic_config: write config.json with the pre-transformers-5 keys (torch_dtype,
    rope_theta, rope_scaling) that most downloaded checkpoints still use.
    """
    storage_dtype = _storage_dtype(dtype, size)
    config = write_model_metadata(path, family, size, storage_dtype, classic_config)
    write_random_weights(config.path, config, seed, storage_dtype, shards)
    return config.path


def write_model_metadata(
    path: str | Path,
    family: str,
    size: str,
    dtype: torch.dtype,
    classic_config: bool = False,
) -> ModelConfig:
    """Everything but the weights: config.json, generation_config.json and the tokenizer files."""
    kwargs = shape_kwargs(family, size)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(folder, family)
    chat = CHAT_FORMATS[family]
    bos_id = tokenizer.token_to_id(chat.bos_token) if chat.bos_token else None
    eos_id = tokenizer.token_to_id(chat.eos_token)
    config_class, architecture = FAMILIES[family]
    kwargs["vocab_size"] = kwargs["vocab_size"] or tokenizer.get_vocab_size()
    config = config_class(
        **kwargs,
        architectures=[architecture],
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        dtype=str(dtype).removeprefix("torch."),
    )
    config.save_pretrained(folder)
    if classic_config:
        rewrite_config_classic(folder / "config.json")
    stop_ids = [tokenizer.token_to_id(token) for token in chat.stop_tokens]
    GenerationConfig(bos_token_id=bos_id, eos_token_id=stop_ids).save_pretrained(folder)
    return load_model_config(folder)


def default_model_path() -> Path:
    """The built-in model `make serve` uses (served as "kubellm-default"), built once per cache dir.

    Built in a temporary sibling folder and renamed into place, so a concurrent or
    interrupted build never leaves a half-written model where the server looks.
    """
    target = cache_dir() / "models" / _DEFAULT_MODEL_DIR
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        make_model_folder(staging, family="llama", size="tiny", seed=0)
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # not a lost race with another builder: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Hugging Face checkpoint of a supported family, named as the published ones are.

    Experts are stored one tensor per expert and projection, as Mixtral and
    Qwen3-MoE checkpoints on the hub are.
    """
    hidden = config.hidden_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    is_gemma = config.local_rope is not None
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        shapes[layer + "input_layernorm.weight"] = (hidden,)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            shapes[f"{layer}self_attn.{proj}.weight"] = (rows, hidden)
            if config.qkv_bias:
                shapes[f"{layer}self_attn.{proj}.bias"] = (rows,)
        shapes[layer + "self_attn.o_proj.weight"] = (hidden, q_rows)
        if config.o_proj_bias:
            shapes[layer + "self_attn.o_proj.bias"] = (hidden,)
        if config.qk_norm:
            shapes[layer + "self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[layer + "self_attn.k_norm.weight"] = (config.head_dim,)
        shapes[layer + "post_attention_layernorm.weight"] = (hidden,)
        if is_gemma:
            shapes[layer + "pre_feedforward_layernorm.weight"] = (hidden,)
            shapes[layer + "post_feedforward_layernorm.weight"] = (hidden,)
        shapes.update(_mlp_shapes(config, i, layer))
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _mlp_shapes(config: ModelConfig, index: int, layer: str) -> dict[str, tuple[int, ...]]:
    """A layer's dense gated MLP, or its router and experts."""
    hidden = config.hidden_size
    mlp = f"{layer}{MLP_MODULE_NAME.get(config.architecture, 'mlp')}."
    if config.moe is not None and config.moe.sparse_layers[index]:
        inter = config.moe.intermediate_size
        shapes: dict[str, tuple[int, ...]] = {mlp + "gate.weight": (config.moe.num_experts, hidden)}
        projections = MODEL_REGISTRY[config.architecture].expert_projections
        for expert in range(config.moe.num_experts):
            for proj, (_, part) in projections.items():
                shapes[f"{mlp}experts.{expert}.{proj}.weight"] = (hidden, inter) if part == 2 else (inter, hidden)
        return shapes
    inter = config.intermediate_size
    shapes = {}
    for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
        shapes[f"{mlp}{proj}.weight"] = shape
        if config.mlp_bias:
            shapes[f"{mlp}{proj}.bias"] = shape[:1]
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """The float32 value of one tensor: a function of (seed, name, shape) and the device's generator only."""
    # torch's CPU generator keeps 32 bits of a seed, so seed and name are hashed into 32 bits together.
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    return noise * shape[1] ** -0.5


def write_random_weights(folder: Path, config: ModelConfig, seed: int, dtype: torch.dtype, shards: int) -> None:
    """model.safetensors, or `shards` files plus model.safetensors.index.json like transformers writes."""
    shapes = checkpoint_shapes(config)
    groups = _split_evenly(shapes, shards)
    weight_map: dict[str, str] = {}
    total = 0
    for number, group in enumerate(groups, start=1):
        file_name = "model.safetensors" if shards == 1 else f"model-{number:05d}-of-{shards:05d}.safetensors"
        total += write_safetensors(folder / file_name, group, dtype, lambda name: random_tensor(name, shapes[name], seed))
        weight_map.update(dict.fromkeys(group, file_name))
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def rewrite_config_classic(config_file: Path) -> None:
    """Turn a transformers-5 config.json into the classic form: torch_dtype, rope_theta, rope_scaling."""
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    rope = dict(raw.pop("rope_parameters", None) or {})
    raw["rope_theta"] = rope.pop("rope_theta", 10000.0)
    raw["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    config_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _split_evenly(shapes: dict[str, tuple[int, ...]], shards: int) -> list[dict[str, tuple[int, ...]]]:
    """Consecutive groups of tensors with about the same number of elements each."""
    if not 1 <= shards <= len(shapes):
        raise ValueError(f"shards must be between 1 and {len(shapes)}, got {shards}")
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total, done = sum(sizes.values()), 0
    groups: list[dict[str, tuple[int, ...]]] = [{} for _ in range(shards)]
    for position, (name, shape) in enumerate(shapes.items()):
        remaining_tensors = len(shapes) - position
        group = min(shards - 1, done * shards // total)
        group = max(group, shards - remaining_tensors)  # leave no shard empty
        groups[group][name] = shape
        done += sizes[name]
    return groups



def _storage_dtype(dtype: str | torch.dtype | None, size: str) -> torch.dtype:
    if dtype is None:
        return torch.float32 if size == "tiny" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]
