"""Which LinearMethod a checkpoint needs, from config.json's `quantization_config` and `--quantization`.

Names follow vLLM: `fp8`, `awq`, `gptq`, `compressed-tensors`. A checkpoint's
own quantization_config decides when present (the flag may repeat it, not
contradict it); `--quantization fp8` on a 16-bit checkpoint quantizes it while
it loads. Anything else fails naming the method, its bit width and what is
supported, before a byte of weights is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from engine.errors import UnsupportedModelError
from engine.layers.quantization.base import LinearMethod
from engine.layers.quantization.fp8 import Fp8LinearMethod, Fp8Scheme
from engine.layers.quantization.names import QUANTIZATION_METHODS
from engine.layers.quantization.w4a16 import W4A16LinearMethod, W4A16Scheme

SUPPORTED = (
    "fp8 (per-tensor or per-channel weights, static or dynamic per-token activations; or online from 16-bit), "
    "awq (4-bit gemm), gptq (4-bit, desc_act true or false), "
    "compressed-tensors (float-quantized fp8 W8A8, pack-quantized 4-bit W4A16)"
)


def linear_method_for(
    flag: str | None, quantization_config: dict[str, Any] | None, source: str
) -> LinearMethod | None:
    """The method for every linear layer (None: dense); `source` names config.json in errors."""
    if flag is not None and flag not in QUANTIZATION_METHODS:
        raise UnsupportedModelError(f"quantization {flag!r} is not supported; supported: {SUPPORTED}")
    if not quantization_config:
        if flag is None:
            return None
        if flag == "fp8":
            return Fp8LinearMethod(Fp8Scheme(serialized=False, per_channel_weight_scale=True, static_activation=False))
        raise UnsupportedModelError(
            f"--quantization {flag} needs a {flag} checkpoint, but {source} has no quantization_config "
            "(only fp8 can quantize a 16-bit checkpoint while loading it)"
        )
    method = str(quantization_config.get("quant_method", "")).lower().replace("_", "-")
    if flag is not None and flag != method:
        raise UnsupportedModelError(f"--quantization {flag} contradicts {source}, whose quant_method is {method!r}")
    parse = _PARSERS.get(method)
    if parse is None:
        raise _unsupported(source, method, quantization_config.get("bits"))
    return parse(quantization_config, source)


def ignored_module_patterns(quantization_config: dict[str, Any] | None) -> list[str]:
    """Modules the checkpoint left unquantized (compressed-tensors `ignore`, AWQ `modules_to_not_convert`)."""
    if not quantization_config:
        return []
    return list(quantization_config.get("ignore") or quantization_config.get("modules_to_not_convert") or [])


def check_no_ignored_linear_layers(patterns: list[str], linear_names: Iterable[str], source: str) -> None:
    """Only lm_head and embeddings may be left unquantized: every decoder linear layer uses one method."""
    for name in linear_names:
        for pattern in patterns:
            regex = pattern[3:] if pattern.startswith("re:") else None
            if (regex is not None and re.match(regex, name)) or (regex is None and pattern in name):
                raise UnsupportedModelError(
                    f"{source} leaves {name} unquantized ({pattern!r}); mixing quantized and 16-bit "
                    "decoder linear layers is not supported"
                )


def _unsupported(source: str, method: str, bits: object) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{source}: quantization {method or '(no quant_method)'} with {bits or 'unknown'} bits is not supported; "
        f"supported: {SUPPORTED}"
    )


def _require_4_bits(source: str, method: str, bits: object) -> None:
    if bits != 4:
        raise _unsupported(source, method, bits)


def _group_size(source: str, value: object) -> int:
    group = -1 if value in (None, -1) else value
    if not isinstance(group, int) or (group != -1 and (group < 16 or group % 16)):
        raise UnsupportedModelError(f"{source}: group_size {value!r} is not supported (-1 or a multiple of 16)")
    return group


def _fp8(config: dict[str, Any], source: str) -> LinearMethod:
    if config.get("weight_block_size"):
        raise UnsupportedModelError(
            f"{source}: fp8 with block-wise weight scales (weight_block_size {config['weight_block_size']}) is not "
            f"supported; supported: {SUPPORTED}"
        )
    scheme = config.get("activation_scheme", "dynamic")
    if scheme not in ("static", "dynamic"):
        raise UnsupportedModelError(f"{source}: fp8 activation_scheme {scheme!r} is not static or dynamic")
    return Fp8LinearMethod(Fp8Scheme(serialized=True, per_channel_weight_scale=False,
                                     static_activation=scheme == "static"))


def _awq(config: dict[str, Any], source: str) -> LinearMethod:
    bits = config.get("bits", config.get("w_bit"))
    _require_4_bits(source, "awq", bits)
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise UnsupportedModelError(f"{source}: AWQ version {version!r} is not supported (only gemm)")
    return W4A16LinearMethod(W4A16Scheme(
        checkpoint_format="awq",
        group_size=_group_size(source, config.get("group_size", config.get("q_group_size"))),
        zero_point=bool(config.get("zero_point", True)),
        act_order=False,
    ))


def _gptq(config: dict[str, Any], source: str) -> LinearMethod:
    _require_4_bits(source, "gptq", config.get("bits"))
    checkpoint_format = str(config.get("checkpoint_format", "gptq"))
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise UnsupportedModelError(f"{source}: GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                                    "(gptq or gptq_v2)")
    return W4A16LinearMethod(W4A16Scheme(
        checkpoint_format=checkpoint_format,
        group_size=_group_size(source, config.get("group_size")),
        zero_point=True,  # GPTQ stores qzeros even when symmetric
        act_order=bool(config.get("desc_act", False)),
    ))


# compressed-tensors' aliases (ActivationOrdering.get_aliases): llm-compressor's GPTQModifier writes "static"
# by default; True is the older boolean form of "group".
_ACTORDER_NAMES = {True: "group", "dynamic": "group", "static": "weight"}


def _compressed_tensors(config: dict[str, Any], source: str) -> LinearMethod:
    for extra in ("sparsity_config", "transform_config"):
        if config.get(extra):
            raise UnsupportedModelError(f"{source}: compressed-tensors with a {extra} is not supported")
    groups = config.get("config_groups") or {}
    if len(groups) != 1:
        raise UnsupportedModelError(
            f"{source}: compressed-tensors with {len(groups)} config_groups is not supported (exactly one)"
        )
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    activations = group.get("input_activations")
    kind, bits = weights.get("type"), weights.get("num_bits")
    fmt = group.get("format") or config.get("format")
    if kind == "float" and bits == 8 and activations and activations.get("type") == "float":
        strategy = weights.get("strategy")
        if strategy not in ("tensor", "channel"):
            raise UnsupportedModelError(f"{source}: fp8 weight strategy {strategy!r} is not supported "
                                        "(tensor or channel)")
        dynamic = bool(activations.get("dynamic"))
        if activations.get("strategy") != ("token" if dynamic else "tensor"):
            raise UnsupportedModelError(f"{source}: fp8 activations {activations.get('strategy')!r} "
                                        f"(dynamic {dynamic}) are not supported (dynamic token or static tensor)")
        return Fp8LinearMethod(Fp8Scheme(serialized=True, per_channel_weight_scale=strategy == "channel",
                                         static_activation=not dynamic))
    if kind == "int" and bits == 4 and activations is None and fmt == "pack-quantized":
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise UnsupportedModelError(f"{source}: 4-bit weight strategy {strategy!r} is not supported "
                                        "(group or channel)")
        actorder = _ACTORDER_NAMES.get(weights.get("actorder"), weights.get("actorder"))
        if actorder not in (None, False, "group", "weight"):
            raise UnsupportedModelError(f"{source}: actorder {actorder!r} is not supported "
                                        "(group, weight or their aliases dynamic, static)")
        return W4A16LinearMethod(W4A16Scheme(
            checkpoint_format="compressed-tensors",
            group_size=_group_size(source, weights.get("group_size") if strategy == "group" else -1),
            zero_point=not weights.get("symmetric", True),
            act_order=actorder == "group",  # "weight" order needs no g_idx: groups stay consecutive
        ))
    described = f"{kind} weights, format {fmt}, activations {activations and activations.get('type')}"
    raise UnsupportedModelError(
        f"{source}: compressed-tensors {described} with {bits} bits is not supported; supported: {SUPPORTED}"
    )


_PARSERS = {"fp8": _fp8, "awq": _awq, "gptq": _gptq, "compressed-tensors": _compressed_tensors}
