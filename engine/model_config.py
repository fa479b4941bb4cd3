"""What the engine needs to know about a Hugging Face model folder, read from its config.json.

Checkpoints in the wild come in two config.json dialects: the classic one
(`torch_dtype`, top-level `rope_theta` / `rope_scaling`) and the one
transformers 5 writes (`dtype`, `rope_parameters`). Both are read here, so the
rest of the engine sees one typed ModelConfig and never touches raw JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError, UnsupportedModelError

# Mistral and Qwen2 are Llama with different defaults; these are the differences that matter here.
# qkv_bias: Qwen2 always has q/k/v biases; Llama has them only when `attention_bias` is set.
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"model_type": "llama", "qkv_bias": None},
    "MistralForCausalLM": {"model_type": "mistral", "qkv_bias": False},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "qkv_bias": True},
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def auto_dtype(checkpoint_dtype: torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """What dtype "auto" means: the checkpoint's on a GPU, float32 on CPU (half precision there is slow and inexact)."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.bfloat16


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `llama3` and `linear` rescale the inverse frequencies."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    path: Path
    architecture: str
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    dtype: torch.dtype  # the checkpoint's dtype (what "auto" means on a GPU)
    rope: RopeConfig
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def max_model_len(self) -> int:
        """Longest context this engine serves exactly.

        Attention here is always full attention. A sliding window (Mistral v0.1:
        4096) only changes results for contexts longer than the window, so the
        context is capped at the window instead of silently diverging.
        """
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)


def load_model_config(model_path: str | Path) -> ModelConfig:
    """Read config.json (and generation_config.json when present) of a model folder."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{config_file} is missing: not a Hugging Face model folder")
    raw = read_json_object(config_file)
    generation_file = folder / "generation_config.json"
    generation = read_json_object(generation_file) if generation_file.is_file() else {}
    return parse_model_config(raw, generation, folder)


def parse_model_config(raw: dict[str, Any], generation: dict[str, Any], path: Path) -> ModelConfig:
    """Turn the parsed config.json / generation_config.json dicts into a ModelConfig."""
    config_file = path / "config.json"
    architecture = _architecture(raw, config_file)
    defaults = _ARCHITECTURES[architecture]
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{config_file}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    try:
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        attention_bias = bool(raw.get("attention_bias", False))
        qkv_bias = defaults["qkv_bias"] if defaults["qkv_bias"] is not None else attention_bias
        return ModelConfig(
            path=path,
            architecture=architecture,
            model_type=raw.get("model_type", defaults["model_type"]),
            hidden_size=hidden_size,
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden_size // num_heads),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=architecture == "LlamaForCausalLM" and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            dtype=_dtype(raw, config_file),
            rope=_rope(raw, config_file),
            sliding_window=_sliding_window(raw),
            bos_token_id=_first_id(generation.get("bos_token_id", raw.get("bos_token_id"))),
            eos_token_ids=_eos_ids(generation.get("eos_token_id"), raw.get("eos_token_id")),
        )
    except KeyError as missing:
        raise ModelLoadError(f"{config_file}: required key {missing.args[0]!r} is missing") from None
    except (TypeError, ValueError) as bad:
        raise ModelLoadError(f"{config_file}: invalid value ({bad})") from None


def read_json_object(file: Path) -> dict[str, Any]:
    """A model file that must hold a JSON object (config.json, generation_config.json); ModelLoadError names it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{file} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _architecture(raw: dict[str, Any], config_file: Path) -> str:
    named = list(raw.get("architectures") or [])
    for name in named:
        if name in _ARCHITECTURES:
            return name
    if not named:  # older folders name only the model_type
        for name, defaults in _ARCHITECTURES.items():
            if raw.get("model_type") == defaults["model_type"]:
                return name
    found = named or [raw.get("model_type")]
    raise UnsupportedModelError(
        f"{config_file}: architecture {', '.join(map(str, found))} is not supported; "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _dtype(raw: dict[str, Any], config_file: Path) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise ModelLoadError(f"{config_file}: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _rope(raw: dict[str, Any], config_file: Path) -> RopeConfig:
    # transformers 5 folds rope_theta into rope_parameters; classic configs keep it top level.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"{config_file}: rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and (original is None or "factor" not in params):
        raise ModelLoadError(f"{config_file}: llama3 rope scaling needs factor and original_max_position_embeddings")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original is not None else None,
    )


def _sliding_window(raw: dict[str, Any]) -> int | None:
    # Qwen2 configs carry a sliding_window that is switched off by use_sliding_window=false.
    if raw.get("use_sliding_window") is False:
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def _first_id(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _eos_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    """generation_config.json's eos ids first, then config.json's, without repeats."""
    ids: list[int] = []
    for value in values:
        for token_id in value if isinstance(value, list) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return tuple(ids)
