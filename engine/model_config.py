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
from kernels.cpu_linear import fast_cpu_bfloat16

# How the supported families differ where it matters here.
# qkv_bias: Qwen2 always has q/k/v biases; None: only when `attention_bias` is set (which then covers o_proj too).
# qk_norm: per-head RMSNorm of q and k before the rotary embedding (Qwen3, Gemma 3).
# window_layers: which layers a sliding_window applies to when config.json has no layer_types:
#   "all" (Mistral, Mixtral), "from_max_window_layers" (Qwen, under use_sliding_window), "pattern" (Gemma 3).
_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"model_type": "llama", "qkv_bias": None, "qk_norm": False, "window_layers": "all"},
    "MistralForCausalLM": {"model_type": "mistral", "qkv_bias": False, "qk_norm": False, "window_layers": "all"},
    "MixtralForCausalLM": {"model_type": "mixtral", "qkv_bias": False, "qk_norm": False, "window_layers": "all"},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "qkv_bias": True, "qk_norm": False,
                         "window_layers": "from_max_window_layers"},
    "Qwen3ForCausalLM": {"model_type": "qwen3", "qkv_bias": None, "qk_norm": True,
                         "window_layers": "from_max_window_layers"},
    "Qwen3MoeForCausalLM": {"model_type": "qwen3_moe", "qkv_bias": None, "qk_norm": True,
                            "window_layers": "from_max_window_layers"},
    "Gemma3ForCausalLM": {"model_type": "gemma3_text", "qkv_bias": None, "qk_norm": True, "window_layers": "pattern"},
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)
_GEMMA_ARCHITECTURES = ("Gemma3ForCausalLM",)
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DtypeChoice:
    """What "auto" serves in, and why (the start-up report prints the reason)."""

    dtype: torch.dtype
    reason: str


def auto_dtype_choice(checkpoint_dtype: torch.dtype | None, device: str | torch.device) -> DtypeChoice:
    """What dtype "auto" means: the checkpoint's, bfloat16 for quantized GGUF weights, with CPU exceptions.

    On CPU a half-precision checkpoint (or quantized GGUF) serves in bfloat16 where torch
    vectorises bfloat16 (kernels.cpu_linear.fast_cpu_bfloat16): a decode step reads every
    weight once, and bfloat16 halves the bytes (a float16 checkpoint becomes bfloat16: its
    range is float32's, where float16 activations can overflow). A float32 checkpoint, or
    one of unknown dtype, keeps float32; elsewhere half precision runs scalar and float32 is chosen.
    """
    if torch.device(device).type != "cpu":
        chosen = checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.bfloat16
        name = str(chosen).removeprefix("torch.")
        return DtypeChoice(chosen, f"the checkpoint's dtype on a GPU ({name}; bfloat16 for quantized GGUF weights)")
    if checkpoint_dtype is None:
        return DtypeChoice(torch.float32, "float32 on CPU: the checkpoint's dtype is not known")
    if checkpoint_dtype == torch.float32:
        return DtypeChoice(torch.float32, "the checkpoint's float32 on CPU")
    vectorised = fast_cpu_bfloat16()
    if vectorised is None:
        return DtypeChoice(torch.float32, "float32 on CPU: torch has no vectorised bfloat16 kernels for "
                                          "this CPU")
    return DtypeChoice(torch.bfloat16, f"bfloat16 on CPU for a 16-bit or quantized checkpoint: {vectorised}, "
                                       "and a decode step reads half the weight bytes of float32")


def auto_dtype(checkpoint_dtype: torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The dtype of auto_dtype_choice."""
    return auto_dtype_choice(checkpoint_dtype, device).dtype


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
class MoeConfig:
    """A sparse mixture-of-experts MLP: each token runs through top_k of num_experts gated MLPs."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert
    norm_topk_prob: bool  # renormalise the top_k routing probabilities to sum to one
    sparse_layers: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of intermediate_size


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
    layer_windows: tuple[int | None, ...]  # per layer: sliding-window length in tokens, None for global attention
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    qk_norm: bool = False
    hidden_act: str = "silu"  # of the gated MLP: silu, or gelu_pytorch_tanh (GeGLU, Gemma)
    attention_scale: float | None = None  # None: head_dim ** -0.5
    local_rope: RopeConfig | None = None  # rope of the sliding-window layers when it differs (Gemma 3)
    moe: MoeConfig | None = None

    @property
    def sliding_window(self) -> int | None:
        """The longest window any layer uses (None: every layer attends globally)."""
        windows = [window for window in self.layer_windows if window is not None]
        return max(windows) if windows else None

    @property
    def kv_window(self) -> int | None:
        """How far back any layer attends when every layer has a window (then older KV blocks can be freed)."""
        if any(window is None for window in self.layer_windows):
            return None
        return max(self.layer_windows, default=None)

    @property
    def max_model_len(self) -> int:
        """Longest context this engine serves: sliding-window layers attend within their window at any length."""
        return self.max_position_embeddings


def load_model_config(model_path: str | Path) -> ModelConfig:
    """Read config.json (and generation_config.json when present) of a model folder, or a GGUF file's metadata."""
    from engine.gguf_metadata import is_gguf_file, load_gguf_model_config  # it imports this module

    folder = Path(model_path)
    if is_gguf_file(folder):
        return load_gguf_model_config(folder)
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
    is_gemma = architecture in _GEMMA_ARCHITECTURES
    hidden_act = _hidden_act(raw, is_gemma, config_file)
    for softcap in ("attn_logit_softcapping", "final_logit_softcapping"):
        if raw.get(softcap) is not None:
            raise UnsupportedModelError(f"{config_file}: {softcap} is not supported")
    try:
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        num_layers = int(raw["num_hidden_layers"])
        attention_bias = bool(raw.get("attention_bias", False))
        qkv_bias = defaults["qkv_bias"] if defaults["qkv_bias"] is not None else attention_bias
        head_dim = int(raw.get("head_dim") or hidden_size // num_heads)
        return ModelConfig(
            path=path,
            architecture=architecture,
            model_type=raw.get("model_type", defaults["model_type"]),
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_proj_bias=defaults["qkv_bias"] is None and attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            dtype=_dtype(raw, config_file),
            rope=_rope(_global_rope_params(raw, is_gemma), raw, config_file),
            layer_windows=_layer_windows(raw, num_layers, defaults["window_layers"]),
            bos_token_id=_first_id(generation.get("bos_token_id", raw.get("bos_token_id"))),
            eos_token_ids=_eos_ids(generation.get("eos_token_id"), raw.get("eos_token_id")),
            qk_norm=defaults["qk_norm"],
            hidden_act=hidden_act,
            attention_scale=float(raw.get("query_pre_attn_scalar", 256)) ** -0.5 if is_gemma else None,
            local_rope=_rope(_local_rope_params(raw), raw, config_file) if is_gemma else None,
            moe=_moe(raw, num_layers, architecture, config_file),
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


def _hidden_act(raw: dict[str, Any], is_gemma: bool, config_file: Path) -> str:
    if is_gemma:  # Gemma configs name it hidden_activation (and sometimes carry a stale hidden_act)
        name, supported = raw.get("hidden_activation") or "gelu_pytorch_tanh", "gelu_pytorch_tanh"
    else:
        name, supported = raw.get("hidden_act", "silu"), "silu"
    if name != supported:
        raise UnsupportedModelError(f"{config_file}: activation {name!r} is not supported (only {supported})")
    return name


def _global_rope_params(raw: dict[str, Any], is_gemma: bool) -> dict[str, Any]:
    """The rope parameters of the (global-attention) layers in either config dialect.

    transformers 5 folds rope_theta into rope_parameters, and for Gemma 3 keys
    them by layer type; classic configs keep rope_theta top level next to rope_scaling.
    """
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if is_gemma:
        if "full_attention" in params:
            return dict(params["full_attention"] or {})
        params.setdefault("rope_theta", raw.get("rope_theta", 1_000_000.0))
    return params


def _local_rope_params(raw: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's sliding-window layers: plain rope at rope_local_base_freq, never scaled."""
    params = raw.get("rope_parameters") or {}
    if "sliding_attention" in params:
        return dict(params["sliding_attention"] or {})
    return {"rope_type": "default", "rope_theta": raw.get("rope_local_base_freq", 10_000.0)}


def _rope(params: dict[str, Any], raw: dict[str, Any], config_file: Path) -> RopeConfig:
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


def _layer_windows(raw: dict[str, Any], num_layers: int, window_layers: str) -> tuple[int | None, ...]:
    """Each layer's sliding window, from layer_types when config.json has them, else the family's rule."""
    window = raw.get("sliding_window")
    # Qwen configs carry a sliding_window that use_sliding_window=false switches off.
    if not window or raw.get("use_sliding_window") is False:
        return (None,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ValueError(f"layer_types names {len(layer_types)} layers, num_hidden_layers is {num_layers}")
        sliding = [kind == "sliding_attention" for kind in layer_types]
    elif window_layers == "pattern":  # Gemma 3: every sliding_window_pattern-th layer is global
        pattern = int(raw.get("sliding_window_pattern", 6))
        sliding = [(i + 1) % pattern != 0 for i in range(num_layers)]
    elif window_layers == "from_max_window_layers":
        first = int(raw.get("max_window_layers", num_layers))
        sliding = [i >= first for i in range(num_layers)]
    else:
        sliding = [True] * num_layers
    return tuple(int(window) if is_sliding else None for is_sliding in sliding)


def _moe(raw: dict[str, Any], num_layers: int, architecture: str, config_file: Path) -> MoeConfig | None:
    """Mixtral (num_local_experts) and Qwen3-MoE (num_experts, moe_intermediate_size, mlp_only_layers)."""
    num_experts = raw.get("num_local_experts") or raw.get("num_experts")
    if architecture not in ("MixtralForCausalLM", "Qwen3MoeForCausalLM") or not num_experts:
        return None
    if raw.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError(f"{config_file}: shared experts are not supported")
    dense_layers = set(raw.get("mlp_only_layers") or [])
    step = int(raw.get("decoder_sparse_step", 1))
    return MoeConfig(
        num_experts=int(num_experts),
        top_k=int(raw["num_experts_per_tok"]),
        intermediate_size=int(raw.get("moe_intermediate_size") or raw["intermediate_size"]),
        # Mixtral always renormalises; Qwen3-MoE only when norm_topk_prob says so (its default is false).
        norm_topk_prob=architecture == "MixtralForCausalLM" or bool(raw.get("norm_topk_prob", False)),
        sparse_layers=tuple(i not in dense_layers and (i + 1) % step == 0 for i in range(num_layers)),
    )


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
