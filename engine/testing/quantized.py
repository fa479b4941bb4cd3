"""Quantized copies of a model folder, written in the exact layouts the quantization projects publish.

Used by tests (tiny models) and GPU benchmarks (Llama-3.1-8B / 70B shapes), where
the projects' own tools cannot run or would need calibration data. Weights are
round-to-nearest quantized (kernels/quant_reference.py), then stored as:

  fp8              quant_method fp8 (AutoFP8 / llm-compressor export): weight fp8, weight_scale per tensor
  fp8-channel      compressed-tensors float-quantized: weight fp8, weight_scale [N, 1], dynamic per-token activations
  awq              AutoAWQ gemm: qweight [K, N/8] (packing order 0 2 4 6 1 3 5 7), qzeros, scales
  gptq             GPTQ v1 (AutoGPTQ): qweight [K/8, N], qzeros storing z - 1, scales, g_idx; symmetric
  gptq-act-order   the same with desc_act: rows quantized in a random order, g_idx per row
  compressed-tensors  pack-quantized W4A16: weight_packed [N, K/8] (q + 8), weight_scale [N, K/G],
                   weight_zero_point [N/8, K/G] when asymmetric, weight_shape

One safetensors file per decoder layer (plus one for the rest) keeps host memory
to one layer at a time, so the 70B shape can be written on an ordinary machine.
"""

from __future__ import annotations

import json
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.layers.quantization.w4a16 import AWQ_ORDER
from engine.model_config import ModelConfig
from engine.testing.factory import checkpoint_shapes, random_tensor, write_model_metadata
from kernels.quant_reference import (
    FP8_DTYPE,
    FP8_MAX,
    PACK_FACTOR,
    pack_int4,
    quantize_fp8_per_channel,
    quantize_w4,
    unpack_int4,
)

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZED_FORMATS = ("fp8", "fp8-channel", "awq", "gptq", "gptq-act-order", "compressed-tensors")
_LINEAR_WEIGHT = re.compile(rf"^model\.layers\.(\d+)\..*\.({'|'.join(LINEAR_NAMES)})\.weight$")

Tensors = dict[str, torch.Tensor]


def quantize_model_folder(
    source: Path, target: Path, fmt: str, group_size: int = 128, zero_point: bool = True,
    device: str | torch.device = "cpu", seed: int = 0,
) -> Path:
    """Write `target`: `source` (a 16/32-bit folder) with every decoder linear layer quantized as `fmt`."""
    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".safetensors") and item.name != "model.safetensors.index.json":
            shutil.copy2(item, target / item.name)
    _write_quantized(target, _tensors_by_layer(source), fmt, group_size, zero_point, device, seed)
    return target


def write_random_quantized_folder(
    target: Path, family: str, size: str, fmt: str, group_size: int = 128, zero_point: bool = True,
    device: str | torch.device = "cpu", seed: int = 0,
) -> Path:
    """A random-weight model of a factory shape written straight in `fmt`, one layer at a time.

    No 16-bit copy is ever written: the 70B shape (141 GB in bf16) fits on a small disk as W4A16.
    Values come from the factory's random_tensor drawn on `device` (a GPU's generator: other values, same scales).
    """
    config = write_model_metadata(target, family, size, torch.bfloat16)
    _write_quantized(Path(target), _random_tensors_by_layer(config, device, seed), fmt, group_size, zero_point,
                     device, seed)
    return Path(target)


def _write_quantized(target: Path, parts: Iterator[tuple[str, Tensors]], fmt: str, group_size: int,
                     zero_point: bool, device: str | torch.device, seed: int) -> None:
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"format must be one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    dtype = _checkpoint_dtype(config)
    config["quantization_config"] = quantization_config(fmt, group_size, zero_point)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    weight_map: dict[str, str] = {}
    for part, tensors in parts:
        out: Tensors = {}
        for name, tensor in tensors.items():
            if _LINEAR_WEIGHT.match(name):
                prefix = name[: -len("weight")]
                generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{_input_key(name)}".encode()))
                quantized = quantize_linear_weight(fmt, tensor.to(device), group_size, zero_point, dtype, generator)
                for suffix, value in quantized.items():
                    out[prefix + suffix] = value.cpu().contiguous()
            else:
                out[name] = tensor.to(dtype).cpu().contiguous()
        file_name = f"model-{part}.safetensors"
        save_file(out, str(target / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file_name))
    index = {"metadata": {}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def quantization_config(fmt: str, group_size: int, zero_point: bool) -> dict[str, object]:
    """config.json's quantization_config as each project writes it."""
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": zero_point,
                "version": "gemm", "modules_to_not_convert": None}
    if fmt in ("gptq", "gptq-act-order"):
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": fmt == "gptq-act-order",
                "sym": True, "checkpoint_format": "gptq", "static_groups": False, "true_sequential": True}
    if fmt == "fp8-channel":
        scheme = {"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                              "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                        "dynamic": True},
                  "targets": ["Linear"], "format": "float-quantized"}
        return _compressed_tensors_config(scheme, "float-quantized")
    weights = {"num_bits": 4, "type": "int", "symmetric": not zero_point, "dynamic": False, "actorder": None,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return _compressed_tensors_config(
        {"weights": weights, "input_activations": None, "targets": ["Linear"], "format": "pack-quantized"},
        "pack-quantized",
    )


def _compressed_tensors_config(scheme: dict[str, object], fmt: str) -> dict[str, object]:
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": scheme},
            "ignore": ["lm_head"], "quantization_status": "compressed", "kv_cache_scheme": None}


def _part_of(name: str) -> str:
    """The output file part of a tensor: its decoder layer ("layer-00003"), else "rest"."""
    match = re.match(r"^model\.layers\.(\d+)\.", name)
    return f"layer-{int(match.group(1)):05d}" if match else "rest"


def _random_tensors_by_layer(config: ModelConfig, device: str | torch.device, seed: int
                             ) -> Iterator[tuple[str, Tensors]]:
    """The factory's tensors of each decoder layer (then the rest), drawn on `device`, one layer at a time."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in checkpoint_shapes(config).items():
        layers.setdefault(_part_of(name), {})[name] = shape
    for part, shapes in sorted(layers.items()):
        tensors = {name: random_tensor(name, shape, seed, device) for name, shape in shapes.items()}
        yield part, tensors


def _input_key(name: str) -> str:
    """Layers that read the same input share it: GPTQ's act order comes from that input, so q/k/v
    (and gate/up) of one layer share one row order, as real act-order checkpoints do."""
    for parts, shared in ((("q_proj", "k_proj", "v_proj"), "qkv"), (("gate_proj", "up_proj"), "gate_up")):
        for part in parts:
            if f".{part}." in name:
                return name.replace(part, shared)
    return name


def _checkpoint_dtype(config: dict[str, object]) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return getattr(torch, name)


def _tensors_by_layer(folder: Path) -> Iterator[tuple[str, Tensors]]:
    """("layer-i", that decoder layer's tensors) for each layer, then ("rest", everything else)."""
    readers = {file: safe_open(str(file), framework="pt") for file in sorted(folder.glob("*.safetensors"))}
    layers: dict[str, list[tuple[str, object]]] = {}
    for reader in readers.values():
        for name in reader.keys():
            layers.setdefault(_part_of(name), []).append((name, reader))
    for part, members in sorted(layers.items()):
        yield part, {name: reader.get_tensor(name) for name, reader in members}


def quantize_linear_weight(fmt: str, weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                           generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One nn.Linear weight [N, K] -> that format's checkpoint tensors, named without the module prefix."""
    return _QUANTIZERS[fmt](weight, group_size, zero_point, dtype, generator)


# --- the formats --------------------------------------------------------------------------------------

Quantizer = Callable[[torch.Tensor, int, bool, torch.dtype, torch.Generator], Tensors]


def _fp8_per_tensor(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                    generator: torch.Generator) -> Tensors:
    scale = (weight.float().abs().max() / FP8_MAX).clamp(min=1e-12)
    quantized = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return {"weight": quantized, "weight_scale": scale.reshape(())}


def _fp8_per_channel(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                     generator: torch.Generator) -> Tensors:
    quantized, scale = quantize_fp8_per_channel(weight)
    return {"weight": quantized, "weight_scale": scale.to(dtype).reshape(-1, 1)}


def _w4(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [K, N] 0..15, scales [groups, N], zeros [groups, N] as integers) of weight [N, K]."""
    qweight, scales, zeros = quantize_w4(weight.to(dtype), group_size, zero_point)
    if zeros is None:
        zeros = torch.full_like(scales, 8)
    return unpack_int4(qweight, 0), scales, zeros.round().to(torch.int32)


def _awq(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
         generator: torch.Generator) -> Tensors:
    q, scales, zeros = _w4(weight, group_size, zero_point, dtype)

    def pack_awq(values: torch.Tensor) -> torch.Tensor:  # nibble i holds column AWQ_ORDER[i] of each 8
        rows, cols = values.shape
        ordered = values.reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)[..., list(AWQ_ORDER)]
        return pack_int4(ordered.reshape(rows, cols), 1)

    return {"qweight": pack_awq(q), "qzeros": pack_awq(zeros), "scales": scales.to(torch.float16)}


def _gptq(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
          generator: torch.Generator, act_order: bool = False) -> Tensors:
    n, k = weight.shape
    group = k if group_size == -1 else group_size
    order = torch.randperm(k, generator=generator) if act_order else torch.arange(k)
    q, scales, zeros = _w4(weight[:, order.to(weight.device)], group_size, False, dtype)  # GPTQ sym
    q_rows = torch.empty_like(q)
    q_rows[order.to(q.device)] = q  # back to the checkpoint's row order
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group).to(torch.int32)
    return {"qweight": pack_int4(q_rows, 0), "qzeros": pack_int4((zeros - 1) & 0xF, 1),
            "scales": scales.to(torch.float16), "g_idx": g_idx}


def _gptq_act_order(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                    generator: torch.Generator) -> Tensors:
    return _gptq(weight, group_size, zero_point, dtype, generator, act_order=True)


def _compressed_tensors_w4(weight: torch.Tensor, group_size: int, zero_point: bool, dtype: torch.dtype,
                           generator: torch.Generator) -> Tensors:
    q, scales, zeros = _w4(weight, group_size, zero_point, dtype)
    tensors = {"weight_packed": pack_int4(q.t(), 1), "weight_scale": scales.t().to(dtype),
               "weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}
    if zero_point:
        tensors["weight_zero_point"] = pack_int4(zeros.t(), 0)
    return tensors


_QUANTIZERS: dict[str, Quantizer] = {
    "fp8": _fp8_per_tensor,
    "fp8-channel": _fp8_per_channel,
    "awq": _awq,
    "gptq": _gptq,
    "gptq-act-order": _gptq_act_order,
    "compressed-tensors": _compressed_tensors_w4,
}
