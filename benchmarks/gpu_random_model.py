"""Write a real-shape random-weight model folder quickly, drawing the random numbers on a GPU.

engine.testing draws every tensor from torch's CPU generator: minutes for an 8B
model, far longer for a 70B one (~141 GB in bf16). This writes the same kind of
folder (engine.testing's config.json, tokenizer and checkpoint names, values
with the same distribution but not the same numbers) as `shards` safetensors
files written in parallel, one CUDA generator per file.

    python -m benchmarks.gpu_random_model --model llama-3.1-70b --model-root /dev/shm/models
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.workloads import MODEL_SHAPES
from engine.testing.factory import checkpoint_shapes, write_model_metadata
from engine.testing.safetensors_stream import write_safetensors

INDEX_FILE = "model.safetensors.index.json"


def gpu_random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """engine.testing.factory.random_tensor's distribution: norms near 1, small biases, fan-in scaling."""
    noise = torch.randn(shape, generator=generator, device=generator.device)
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * noise).cpu()
    if name.endswith(".bias"):
        return (0.1 * noise).cpu()
    return (noise * shape[1] ** -0.5).to(torch.bfloat16).cpu()


def write_folder(folder: Path, family: str, size: str, shards: int, device: str = "cuda") -> int:
    """The folder's weights as `shards` files plus an index; returns the bytes written."""
    config = write_model_metadata(folder, family, size, torch.bfloat16)
    shapes = checkpoint_shapes(config)
    names = list(shapes)
    groups = [names[i::shards] for i in range(shards)]
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]

    def write(i: int) -> int:
        generator = torch.Generator(device=device).manual_seed(i)
        group = {name: shapes[name] for name in groups[i]}
        return write_safetensors(folder / files[i], group, torch.bfloat16,
                                 lambda name: gpu_random_tensor(name, shapes[name], generator))

    with ThreadPoolExecutor(shards) as pool:
        total = sum(pool.map(write, range(shards)))
    weight_map = {name: files[i] for i, group in enumerate(groups) for name in group}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODEL_SHAPES), required=True)
    parser.add_argument("--model-root", required=True)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--device", default="cuda", help="where the random numbers are drawn")
    args = parser.parse_args()
    family, size = MODEL_SHAPES[args.model]
    start = time.perf_counter()
    total = write_folder(Path(args.model_root) / args.model, family, size, args.shards, args.device)
    print(f"{args.model}: {total / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
