"""Write GGUF files the way llama.cpp's converter does, from the factory's random weights.

Tests need GGUF files with known contents and several tensor types; model hubs
are unreachable, so they are written here with gguf's own writer: llama.cpp's
tensor names, its Q/K row permutation for Llama, Gemma's norms stored as 1 + w,
1-D tensors (norms, biases) kept in F32 as llama.cpp keeps them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.gguf_metadata import GGUF_ARCHITECTURES
from engine.model_config import ModelConfig
from engine.models.gguf_loader import (
    GLOBAL_TENSOR_NAMES,
    NORM_PLUS_ONE_ARCHITECTURES,
    PERMUTED_QK_ARCHITECTURES,
    layer_tensor_names,
)
from engine.testing.factory import checkpoint_shapes, random_tensor

_ARCH_OF = {hf: arch for arch, (hf, _) in GGUF_ARCHITECTURES.items()} | {"MistralForCausalLM": "llama"}


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    """llama.cpp's name for a Hugging Face checkpoint tensor name."""
    for gguf_name, name in GLOBAL_TENSOR_NAMES.items():
        if name == hf_name:
            return gguf_name
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    part = next(gguf for gguf, hf in layer_tensor_names(arch).items() if hf == module)
    return f"blk.{layer}.{part}.{kind}"


def permute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_gguf(file: str | Path, config: ModelConfig, tensor_type: str = "F32", seed: int = 0) -> Path:
    """A GGUF file of `config`'s shapes holding the factory's random weights (seeded like the folder's).

    tensor_type: the GGML type of the 2-D weights (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).
    The rotary embedding is written without scaling: GGUF keeps Llama 3 scaling in a tensor.
    Gemma 3 files carry only the window; readers assume every sixth layer global.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize

    file = Path(file)
    arch = _ARCH_OF[config.architecture]
    writer = GGUFWriter(str(file), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope.theta)
    writer.add_rope_dimension_count(config.head_dim)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
    if config.head_dim * config.num_attention_heads != config.hidden_size or arch == "gemma3":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    if config.bos_token_id is not None:
        writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    qtype = GGMLQuantizationType[tensor_type]
    for name, shape in checkpoint_shapes(config).items():
        weight = random_tensor(name, shape, seed)
        if arch in PERMUTED_QK_ARCHITECTURES and ".q_proj." in name:
            weight = permute_rotary_rows(weight, config.num_attention_heads)
        elif arch in PERMUTED_QK_ARCHITECTURES and ".k_proj." in name:
            weight = permute_rotary_rows(weight, config.num_key_value_heads)
        if arch in NORM_PLUS_ONE_ARCHITECTURES and name.endswith("norm.weight"):
            weight = weight + 1.0
        values = weight.numpy().astype(np.float32)
        if values.ndim == 1 or qtype == GGMLQuantizationType.F32:
            writer.add_tensor(gguf_tensor_name(name, arch), values)
        else:
            writer.add_tensor(gguf_tensor_name(name, arch), quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return file
