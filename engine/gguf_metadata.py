"""What the engine needs to know about a GGUF model file, read from its metadata.

A GGUF file (llama.cpp's format, what Ollama stores) holds the model config, the
tokenizer and the weights in one file. Its metadata keys are prefixed with the
llama.cpp architecture name (`llama.block_count`, ...); this module turns them
into the same typed ModelConfig a Hugging Face folder gives, so nothing after
it knows which format the model came in.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Union

import torch

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.model_config import ModelConfig, RopeConfig

GGUF_SUFFIX = ".gguf"

# llama.cpp architecture name -> (Hugging Face architecture, has q/k/v biases).
# llama.cpp writes Mistral (without a sliding window) as "llama".
GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", False),
    "qwen2": ("Qwen2ForCausalLM", True),
    "gemma3": ("Gemma3ForCausalLM", False),
}

# What llama.cpp fixes for Gemma 3 in code rather than in the file's metadata (llama-model.cpp):
# every sixth layer attends globally, the sliding-window layers rotate at base 10000 unscaled,
# and queries are scaled by head_dim ** -0.5, except in the 27B model (62 layers), which
# scales by (hidden_size / num_heads) ** -0.5 (its query_pre_attn_scalar).
GEMMA3_GLOBAL_LAYER_EVERY = 6
GEMMA3_LOCAL_ROPE = RopeConfig(theta=10000.0)
GEMMA3_27B_LAYERS = 62

# What "auto" means on a GPU for a file whose weights are quantized (they are dequantized at load).
QUANTIZED_CHECKPOINT_DTYPE = torch.bfloat16

MetadataValue = Union[int, float, bool, str, list]


def is_gguf_file(path: str | Path) -> bool:
    """A model given as a .gguf file rather than a folder."""
    return Path(path).suffix.lower() == GGUF_SUFFIX


def open_gguf(path: str | Path):  # -> gguf.GGUFReader (the package has no type stubs)
    """gguf's reader on the file; a missing, truncated or non-GGUF file is named in the error.

    Parsing the metadata takes seconds (tens of thousands of tokenizer strings), so
    the config and the weights loader share one reader (the file is memory-mapped)
    while the file is unchanged.
    """
    file = Path(path)
    if not file.is_file():
        raise ModelLoadError(f"GGUF file {file} does not exist")
    stat = file.stat()
    return _read_gguf(file.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _read_gguf(file: Path, size: int, mtime_ns: int):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(file), "r")
    except Exception as error:  # gguf raises ValueError/struct.error/... for bad files
        raise ModelLoadError(f"{file} is not a readable GGUF file: {error}") from None


def read_metadata(reader) -> dict[str, MetadataValue]:
    """Every metadata key with a plain Python value (arrays as lists), except the tokenizer's big arrays."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}
    return {name: field.contents() for name, field in reader.fields.items() if name not in skip}


def load_gguf_model_config(path: str | Path) -> ModelConfig:
    """A ModelConfig from the metadata of a GGUF file; an architecture the engine lacks is named."""
    file = Path(path)
    reader = open_gguf(file)
    meta = read_metadata(reader)
    vocab_size = _vocab_size(reader, _architecture(meta, file), meta, file)
    tensor_names = {tensor.name for tensor in reader.tensors}
    return parse_gguf_config(meta, vocab_size, tensor_names, file)


def parse_gguf_config(
    meta: dict[str, MetadataValue], vocab_size: int, tensor_names: set[str], file: Path
) -> ModelConfig:
    """Turn GGUF metadata into a ModelConfig (pure: the reader is not needed here)."""
    arch = _architecture(meta, file)
    architecture, qkv_bias = GGUF_ARCHITECTURES[arch]
    if "rope_freqs.weight" in tensor_names:  # how llama.cpp stores Llama 3.1's rope scaling
        raise UnsupportedModelError(f"{file}: tensor rope_freqs.weight (per-frequency rope factors) is not supported")

    def key(name: str, default: MetadataValue | None = None) -> MetadataValue:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{file}: metadata key {arch}.{name} is missing")
        return value

    try:
        hidden_size = int(key("embedding_length"))
        num_heads = int(key("attention.head_count"))
        head_dim = int(key("attention.key_length", hidden_size // num_heads))
        rope_dim = int(key("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise UnsupportedModelError(f"{file}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported")
        num_layers = int(key("block_count"))
        if arch == "gemma3":
            family = _gemma3_fields(int(key("attention.sliding_window")), num_layers, hidden_size, num_heads, head_dim)
        else:  # Llama and Qwen2 files attend globally
            family = {"layer_windows": (None,) * num_layers}
        return ModelConfig(
            path=file,
            architecture=architecture,
            model_type=arch,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(key("attention.head_count_kv", num_heads)),
            head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length")),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
            vocab_size=vocab_size,
            max_position_embeddings=int(key("context_length", 2048)),
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias=qkv_bias or "blk.0.attn_q.bias" in tensor_names,
            o_proj_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            dtype=_checkpoint_dtype(meta),
            rope=_rope(meta, arch, file),
            bos_token_id=_optional_int(meta.get("tokenizer.ggml.bos_token_id")),
            eos_token_ids=_eos_ids(meta),
            **family,
        )
    except (TypeError, ValueError) as bad:
        raise ModelLoadError(f"{file}: invalid metadata value ({bad})") from None


def _gemma3_fields(
    sliding_window: int, num_layers: int, hidden_size: int, num_heads: int, head_dim: int
) -> dict[str, object]:
    """The ModelConfig fields where Gemma 3 differs from Llama, as llama.cpp derives them."""
    query_scalar = hidden_size / num_heads if num_layers == GEMMA3_27B_LAYERS else head_dim
    return {
        "qk_norm": True,
        "hidden_act": "gelu_pytorch_tanh",
        "attention_scale": query_scalar**-0.5,
        "local_rope": GEMMA3_LOCAL_ROPE,
        "layer_windows": tuple(
            None if (i + 1) % GEMMA3_GLOBAL_LAYER_EVERY == 0 else sliding_window for i in range(num_layers)
        ),
    }


def _architecture(meta: dict[str, MetadataValue], file: Path) -> str:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{file}: GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return str(arch)


def _vocab_size(reader, arch: str, meta: dict[str, MetadataValue], file: Path) -> int:
    if f"{arch}.vocab_size" in meta:
        return int(meta[f"{arch}.vocab_size"])
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelLoadError(f"{file}: neither {arch}.vocab_size nor tokenizer.ggml.tokens is in the metadata")
    return len(tokens.data)


def _checkpoint_dtype(meta: dict[str, MetadataValue]) -> torch.dtype:
    """general.file_type (llama.cpp's LlamaFileType): 0 all F32, 1 mostly F16, 32 mostly BF16, else quantized."""
    return {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}.get(
        _optional_int(meta.get("general.file_type")), QUANTIZED_CHECKPOINT_DTYPE
    )


def _rope(meta: dict[str, MetadataValue], arch: str, file: Path) -> RopeConfig:
    theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "none":
        return RopeConfig(theta=theta)
    if scaling == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(meta[f"{arch}.rope.scaling.factor"]))
    raise UnsupportedModelError(f"{file}: rope scaling {scaling!r} is not supported (none, linear)")


def _optional_int(value: MetadataValue | None) -> int | None:
    return None if value is None else int(value)


def _eos_ids(meta: dict[str, MetadataValue]) -> tuple[int, ...]:
    """The end-of-sequence token, then the end-of-turn token when the file names another one."""
    ids: list[int] = []
    for name in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = _optional_int(meta.get(name))
        if value is not None and value not in ids:
            ids.append(value)
    return tuple(ids)
