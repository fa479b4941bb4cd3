"""Fill a model from a GGUF file, one tensor at a time, dequantized to the serving dtype.

Each GGUF tensor is read from the memory-mapped file, dequantized to float32
(gguf's own numpy dequantizers, the reference implementation of llama.cpp's
block formats), renamed to its Hugging Face checkpoint name, un-permuted where
llama.cpp permuted it, and handed to the parameter's weight_loader, which casts
it into place. Only one dequantized tensor exists at a time besides the model.

llama.cpp's converter permutes the rows of Q and K of Llama-architecture models
(each head's rotary halves interleaved, its GPT-J-style layout); the engine
rotates the Hugging Face (NeoX) way, so the permutation is undone here, as
transformers' GGUF loader does. For Gemma 3 the converter stores every RMSNorm
weight as 1 + w (llama.cpp's norm multiplies by the weight, Gemma's by 1 + w),
so 1 is subtracted again, and its four norms per layer have names of their own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.errors import UnsupportedModelError
from engine.gguf_metadata import open_gguf
from engine.model_config import ModelConfig

# Tensor types this loader dequantizes; each is covered by tests/test_gguf.py.
SUPPORTED_TENSOR_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")

# llama.cpp tensor name -> Hugging Face name (the engine's checkpoint names).
GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3: norms after attention and around the MLP; ffn_norm is the one before the MLP there.
GEMMA3_LAYER_TENSOR_NAMES = LAYER_TENSOR_NAMES | {
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp architecture -> its layer tensor names, where they differ from Llama's.
ARCHITECTURE_LAYER_TENSOR_NAMES = {"gemma3": GEMMA3_LAYER_TENSOR_NAMES}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Architectures whose Q/K rows llama.cpp's converter permutes.
PERMUTED_QK_ARCHITECTURES = {"llama"}
# Architectures whose RMSNorm weights llama.cpp's converter stores as 1 + w.
NORM_PLUS_ONE_ARCHITECTURES = {"gemma3"}


def layer_tensor_names(arch: str) -> dict[str, str]:
    """llama.cpp's per-layer tensor part (attn_q, ...) -> the Hugging Face module name, for one architecture."""
    return ARCHITECTURE_LAYER_TENSOR_NAMES.get(arch, LAYER_TENSOR_NAMES)


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The Hugging Face checkpoint name of a GGUF tensor; None for a tensor the engine has no use for."""
    if gguf_name in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[gguf_name]
    names = layer_tensor_names(arch)
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in names:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, rows (pair, half) -> (half, pair)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def dequantize(tensor, file: Path) -> torch.Tensor:  # tensor: gguf.ReaderTensor
    """A GGUF tensor as float32 in PyTorch's [rows, cols] order; an unsupported type is named with the tensor."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    type_name = GGMLQuantizationType(tensor.tensor_type).name
    if type_name not in SUPPORTED_TENSOR_TYPES:
        raise UnsupportedModelError(
            f"{file}: tensor {tensor.name} has type {type_name}, which kubellm does not load; "
            f"supported: {', '.join(SUPPORTED_TENSOR_TYPES)}"
        )
    values = gguf_dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a copy: the file is mapped read-only


def gguf_checkpoint_tensors(file: Path, config: ModelConfig) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, Hugging Face name, float32 tensor) for each tensor the engine loads, dequantized one at a time."""
    reader = open_gguf(file)
    permuted = config.model_type in PERMUTED_QK_ARCHITECTURES
    norm_plus_one = config.model_type in NORM_PLUS_ONE_ARCHITECTURES
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, config.model_type)
        if name is None:
            continue
        weight = dequantize(tensor, file)
        if norm_plus_one and name.endswith("norm.weight"):
            weight -= 1.0
        elif permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_rotary_rows(weight, config.num_attention_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
        yield file, name, weight
