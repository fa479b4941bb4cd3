"""Benchmark workloads and model folders, shared by the throughput and latency scripts."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.testing import make_model_folder

QUANTIZED_GROUP_SIZE = 128  # the group of the W4A16 folders and GEMMs the benchmarks write

MODEL_SHAPES = {  # benchmark name -> (engine.testing family, size)
    "llama-3.1-8b": ("llama", "llama-3.1-8b"),
    "llama-3.1-70b": ("llama", "llama-3.1-70b"),  # ~141 GB: build it with benchmarks.gpu_random_model
    "qwen2.5-0.5b": ("qwen2", "qwen2.5-0.5b"),
    "qwen3-8b": ("qwen3", "qwen3-8b"),
    "qwen3-30b-a3b": ("qwen3_moe", "qwen3-30b-a3b"),  # ~61 GB: build it with benchmarks.gpu_random_model
    "mixtral-8x7b": ("mixtral", "mixtral-8x7b"),  # ~93 GB
    "gemma-3-270m": ("gemma3", "gemma-3-270m"),
    "tiny": ("llama", "tiny"),
}


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    output_len: int


def model_folder(shape: str, root: str | Path) -> Path:
    """The random-weight model folder of a benchmark shape, built once under root."""
    family, size = MODEL_SHAPES[shape]
    folder = Path(root) / shape
    if not (folder / "config.json").exists():
        make_model_folder(folder, family=family, size=size)
    return folder


def quantized_model_folder(model: str, fmt: str, root: str | Path) -> tuple[Path, str | None]:
    """(folder, --quantization) for a format name: bf16, fp8-online, or one of QUANTIZED_FORMATS."""
    from engine.testing.quantized import quantize_model_folder, write_random_quantized_folder

    if fmt == "bf16":
        return model_folder(model, root), None
    if fmt == "fp8-online":
        return model_folder(model, root), "fp8"
    target = Path(root) / f"{model}-{fmt}"
    if not (target / "model.safetensors.index.json").exists():
        shutil.rmtree(target, ignore_errors=True)
        family, size = MODEL_SHAPES[model]
        if model == "llama-3.1-70b":  # 141 GB in bf16: never write that
            write_random_quantized_folder(target, family, size, fmt, QUANTIZED_GROUP_SIZE, device="cuda")
        else:
            quantize_model_folder(model_folder(model, root), target, fmt, QUANTIZED_GROUP_SIZE, device="cuda")
    return target, None


def token_id_limit(folder: Path) -> int:
    """Random prompt ids stay below both the tokenizer's and the model's vocabulary size."""
    from transformers import AutoConfig, AutoTokenizer

    return min(len(AutoTokenizer.from_pretrained(folder)), AutoConfig.from_pretrained(folder).vocab_size)


def make_workload(name: str, vocab_size: int, num_requests: int | None = None, seed: int = 0,
                  scale: float = 1.0) -> list[Request]:
    """ "mixed": input and output lengths uniform in [100, 1024]; "fixed": 512 in / 256 out.

    Prompts are random token ids (seeded), so every system sees the same ones.
    scale shrinks the lengths (for smoke tests on a tiny model).
    """
    rng = random.Random(seed)
    if name == "mixed":
        count = num_requests or 256
        lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(count)]
    elif name == "fixed":
        count = num_requests or 1024
        lengths = [(512, 256)] * count
    else:
        raise ValueError(f"unknown workload {name!r}; choose mixed or fixed")
    return [
        Request([rng.randrange(10, vocab_size) for _ in range(max(1, int(n_in * scale)))], max(1, int(n_out * scale)))
        for n_in, n_out in lengths
    ]
