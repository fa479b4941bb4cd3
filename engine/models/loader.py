"""Build a model on its target device and fill it from safetensors or GGUF, one tensor at a time.

Parameters are allocated once, on the target device, in the target dtype; each
checkpoint tensor is read, copied (and cast) into its parameter slice, and
dropped, so host memory never holds more than one tensor of the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.errors import ModelLoadError, UnsupportedModelError
from engine.gguf_metadata import is_gguf_file
from engine.layers.moe import ExpertProjections, expert_checkpoint_names, expert_param_name
from engine.layers.quantization import quantization_scope
from engine.layers.quantization.config import (
    check_no_ignored_linear_layers,
    ignored_module_patterns,
    linear_method_for,
)
from engine.layers.quantization.kv_cache import checked_kv_scale, kv_scale_buffers
from engine.layers.weights import CheckpointSlice, ShapeMismatchError, default_weight_loader
from engine.model_config import DTYPES, ModelConfig, auto_dtype
from engine.models.gguf_loader import gguf_checkpoint_tensors
from engine.models.registry import MODEL_REGISTRY

INDEX_FILE = "model.safetensors.index.json"


def resolve_dtype(dtype: str | torch.dtype, model_config: ModelConfig, device: str | torch.device) -> torch.dtype:
    """A torch dtype from a name, a torch dtype, or "auto" (see auto_dtype)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return auto_dtype(model_config.dtype, device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model_path: str | Path,
    model_config: ModelConfig,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
) -> nn.Module:
    """The model of `model_config.architecture`, weights loaded, in eval mode, no gradients.

    model_path: a Hugging Face folder of safetensors files, or one GGUF file (dequantized as it loads).
    quantization: the `--quantization` flag (None: whatever config.json's quantization_config says).
    """
    source = Path(model_path)
    if is_gguf_file(source):
        tensors: Iterable[tuple[Path, str, torch.Tensor | CheckpointSlice]] = gguf_checkpoint_tensors(source, model_config)
        quantization_config, config_file = None, str(source)
    else:
        tensors = _checkpoint_tensors(checkpoint_files(source))
        quantization_config, config_file = read_quantization_config(source), str(source / "config.json")
    model_class = MODEL_REGISTRY.get(model_config.architecture)
    if model_class is None:
        raise UnsupportedModelError(f"no model class for architecture {model_config.architecture}")
    method = linear_method_for(quantization, quantization_config, config_file)
    with _default_dtype(resolve_dtype(dtype, model_config, device)), torch.device(device), quantization_scope(method):
        model = model_class(model_config)
    if method is not None:
        check_no_ignored_linear_layers(ignored_module_patterns(quantization_config), _linear_checkpoint_names(model),
                                       config_file)
    load_weights(model, tensors, source)
    finish_quantized_layers(model)
    return model.eval()


def read_quantization_config(folder: Path) -> dict[str, Any] | None:
    """config.json's quantization_config (the file itself was validated by load_model_config)."""
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return raw.get("quantization_config") or raw.get("compression_config")


def finish_quantized_layers(model: nn.Module) -> None:
    """Convert every quantized layer's loaded checkpoint tensors to its kernel's layout."""
    with torch.no_grad():
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)


def _linear_checkpoint_names(model: nn.Module) -> Iterator[str]:
    """The checkpoint names of the model's linear layers (fused layers as their parts)."""
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    for name, module in model.named_modules():
        if getattr(module, "quant_method", None) is None:
            continue
        parts = [part for part, (fused, _) in packed.items() if name.endswith(f".{fused}")]
        fused = name.rsplit(".", 1)[-1]
        yield from ([name[: -len(fused)] + part for part in parts] if parts else [name])


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, else every *.safetensors."""
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelLoadError(f"{index_file} is not a valid safetensors index: {error!r}") from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(f"{index_file} names shard(s) missing from {folder}: {', '.join(missing)}")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"no *.safetensors files in {folder} (only safetensors checkpoints are supported, not *.bin)"
        )
    return files


def load_weights(
    model: nn.Module, tensors: Iterable[tuple[Path, str, torch.Tensor | CheckpointSlice]], source: Path
) -> None:
    """Copy every (file, name, tensor) into its parameter; fail naming any tensor that is missing or misshapen.

    KV-cache scales go to the attention layers' k_scale / v_scale buffers (optional: 1.0 when absent).
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    packed: dict[str, tuple[str, object]] = getattr(model, "packed_modules_mapping", {})
    experts: ExpertProjections = getattr(model, "expert_projections", {})
    loaded: set[str] = set()
    with torch.no_grad():
        for file, name, tensor in tensors:
            scale_buffers = kv_scale_buffers(name)
            if scale_buffers is not None:
                _load_kv_scale(buffers, scale_buffers, tensor, name, file)
                continue
            param_name, shard_id = _param_name(name, packed, experts)
            param = params.get(param_name)
            if param is None:  # e.g. rotary_emb.inv_freq, or lm_head.weight of a tied model
                continue
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                weight_loader(param, tensor, shard_id)
            except ShapeMismatchError as error:
                raise ModelLoadError(
                    f"{file}: tensor {name} has shape {list(error.got)}, the model expects {list(error.expected)}"
                ) from None
            loaded.add(name)
    missing = sorted(expected_checkpoint_names(params, packed, experts) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint {source} is missing {len(missing)} tensor(s): {shown}")


def _load_kv_scale(
    buffers: dict[str, torch.Tensor], names: list[str], tensor: torch.Tensor | CheckpointSlice, checkpoint_name: str,
    file: Path,
) -> None:
    """Fill the named scale buffers (a model without them, e.g. another attention layout, ignores the tensor)."""
    scale = checked_kv_scale(tensor[...], checkpoint_name, str(file))
    for name in names:
        if name in buffers:
            buffers[name].fill_(scale)


def expected_checkpoint_names(
    params: dict[str, nn.Parameter], packed: dict[str, tuple[str, object]], experts: ExpertProjections
) -> set[str]:
    """The checkpoint tensor names a model needs: fused and stacked-expert parameters expand to their parts."""
    parts_of: dict[str, list[str]] = {}
    for part, (fused, _) in packed.items():
        parts_of.setdefault(fused, []).append(part)
    names: set[str] = set()
    for name, param in params.items():
        expert_names = expert_checkpoint_names(name, param.shape[0], experts) if experts else None
        fused = next((f for f in parts_of if f".{f}." in name), None)
        if expert_names is not None:
            names.update(expert_names)
        elif fused is None:
            names.add(name)
        else:
            names.update(name.replace(f".{fused}.", f".{part}.") for part in parts_of[fused])
    return names


def _param_name(
    checkpoint_name: str, packed: dict[str, tuple[str, object]], experts: ExpertProjections
) -> tuple[str, object]:
    expert = expert_param_name(checkpoint_name, experts) if experts else None
    if expert is not None:
        return expert
    for part, (fused, shard_id) in packed.items():
        if f".{part}." in checkpoint_name:
            return checkpoint_name.replace(f".{part}.", f".{fused}."), shard_id
    return checkpoint_name, None


def _checkpoint_tensors(files: list[Path]) -> Iterator[tuple[Path, str, CheckpointSlice]]:
    """(file, name, tensor not read yet) for every tensor; a corrupt or truncated file is named in the error.

    Weight loaders read only the part of each tensor their tensor-parallel rank holds.
    """
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():
                    yield file, name, CheckpointSlice(reader.get_slice(name))
        except ModelLoadError:
            raise
        except Exception as error:  # safetensors raises its own SafetensorError / OSError variants
            raise ModelLoadError(f"{file} is not a readable safetensors file: {error}") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
