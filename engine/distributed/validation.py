"""Start-up checks that a tensor-parallel size fits the machine and the model's shape."""

from __future__ import annotations

import torch

from engine.errors import ConfigError


def check_tensor_parallel(
    tp_size: int,
    device: str,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    expert_intermediate_size: int | None = None,
) -> None:
    """Raises ConfigError naming the first thing that cannot be split `tp_size` ways."""
    if tp_size == 1:
        return
    if device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(
                f"tensor_parallel_size={tp_size} uses GPUs 0..{tp_size - 1}; use device='cuda', not {device!r}"
            )
        visible = torch.cuda.device_count()
        if tp_size > visible:
            raise ConfigError(f"tensor_parallel_size={tp_size} needs {tp_size} GPUs, but {visible} are visible")
    if num_attention_heads % tp_size:
        raise ConfigError(
            f"the model's {num_attention_heads} attention heads cannot be split across "
            f"tensor_parallel_size={tp_size} ranks (it must divide them)"
        )
    if num_key_value_heads >= tp_size and num_key_value_heads % tp_size:
        raise ConfigError(
            f"the model's {num_key_value_heads} KV heads cannot be split across "
            f"tensor_parallel_size={tp_size} ranks (it must divide them)"
        )
    if num_key_value_heads < tp_size and tp_size % num_key_value_heads:
        raise ConfigError(
            f"tensor_parallel_size={tp_size} must be a multiple of the model's {num_key_value_heads} KV heads "
            "to replicate them evenly"
        )
    for what, width in (("MLP", intermediate_size), ("experts' MLP", expert_intermediate_size)):
        if width is not None and width % tp_size:
            raise ConfigError(
                f"the model's {what} width {width} cannot be split across "
                f"tensor_parallel_size={tp_size} ranks (it must divide it)"
            )
