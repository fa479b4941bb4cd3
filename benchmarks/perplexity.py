"""Perplexity of a real model on a fixed English text: dense, FP8 weights, W4A16 weights and an FP8 KV cache.

The text (benchmarks/data/declaration_and_constitution.txt: the US Declaration of
Independence and the Constitution's preamble and Article I, public domain) is
tokenized once and cut into windows of --window tokens. Each window runs through
the engine's own model and paged KV cache (EngineCore: the loaders, the quantized
linear layers, the cache-write and attention kernels of the device) as a chunked
prefill of --chunk tokens, so every chunk after the first attends to K/V read back
from the cache, which is where an FP8 cache loses precision. Perplexity is
exp(mean negative log-likelihood) of every token after the first of each window.

    python -m benchmarks.perplexity --w4a16 /tmp/smollm2-w4a16 /tmp/smollm2-gptq-w4a16 --out results/perplexity.json

MODEL defaults to the built-in SmolLM2-135M-Instruct GGUF file, which transformers
dequantizes into a float32 safetensors folder first (--work-dir keeps it). W4A16
checkpoints are made from that folder by llm-compressor (tools/llmcompressor_checkpoints.py,
in a tool venv); without --w4a16 those rows are left out. benchmarks/perplexity_reference.py
computes the same perplexities with transformers, the independent reference.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import print_table, save_json
from engine.attention_metadata import AttentionMetadata
from engine.builtin_model import builtin_model_path
from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.gguf_metadata import is_gguf_file
from engine.tokenizer_loader import load_tokenizer

TEXT = Path(__file__).parent / "data" / "declaration_and_constitution.txt"


@dataclass(frozen=True)
class Variant:
    name: str
    folder: Path
    quantization: str | None = None
    kv_cache_dtype: str = "auto"


def dense_folder(model: Path, work_dir: Path) -> Path:
    """A safetensors folder of the model: itself, or a GGUF file dequantized to float32 by transformers."""
    if not is_gguf_file(model):
        return model
    target = work_dir / f"{model.stem}-float32"
    if (target / "config.json").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(model.parent, gguf_file=model.name, dtype=torch.float32)
    # transformers will not save_pretrained a model it loaded from GGUF: write the dequantized tensors directly.
    target.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous() for name, tensor in hf_model.state_dict().items()
               if not (name == "lm_head.weight" and hf_model.config.tie_word_embeddings)}
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name).save_pretrained(target)
    config = hf_model.config.to_dict()
    del config["quantization_config"]  # the tensors written are plain float32
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def window_nll(core: EngineCore, tokens: list[int], chunk: int) -> tuple[float, int]:
    """Summed negative log-likelihood of tokens[1:] given their prefixes, prefilled `chunk` tokens at a time."""
    runner = core.model_runner
    device = runner.device
    block_size = core.config.block_size
    table = torch.arange(-(-len(tokens) // block_size), dtype=torch.int32, device=device)[None, :]
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(tokens), chunk):
            ids = tokens[start : start + chunk]
            end = start + len(ids)
            positions = torch.arange(start, end, device=device)
            meta = AttentionMetadata(
                slot_mapping=positions.clone(),  # block i of the window is cache block i: slot = position
                query_start_loc=torch.tensor([0, len(ids)], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([end], dtype=torch.int32, device=device),
                block_tables=table,
                max_query_len=len(ids),
                max_seq_len=end,
            )
            hidden = runner.model(torch.tensor(ids, device=device), positions, meta)
            targets = tokens[start + 1 : end + 1]
            logits = runner.model.compute_logits(hidden[: len(targets)])
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            picked = log_probs[torch.arange(len(targets), device=device), torch.tensor(targets, device=device)]
            total -= float(picked.sum())
    return total, len(tokens) - 1


def perplexity(variant: Variant, tokens: list[int], window: int, chunk: int, device: str, dtype: str) -> dict:
    blocks = -(-window // EngineConfig.block_size)  # one window's worth
    config = EngineConfig(model=str(variant.folder), device=device, dtype=dtype, quantization=variant.quantization,
                          kv_cache_dtype=variant.kv_cache_dtype, max_model_len=window, num_kv_blocks=blocks,
                          max_num_seqs=1, max_num_batched_tokens=chunk, enforce_eager=True)
    core = EngineCore(config)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        window_tokens = tokens[start : start + window]
        if len(window_tokens) < 2:
            break
        summed, predicted = window_nll(core, window_tokens, chunk)
        nll, count = nll + summed, count + predicted
    del core
    return {"variant": variant.name, "perplexity": math.exp(nll / count), "tokens": count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        help="Model folder or GGUF file (default: the built-in SmolLM2-135M-Instruct).")
    parser.add_argument("--w4a16", type=Path, nargs="+", default=[],
                        help="W4A16 checkpoints of the same model (llm-compressor), one row each.")
    parser.add_argument("--work-dir", type=Path, default=Path("results/perplexity-models"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="Dense dtype (default: bfloat16 on a GPU, float32 on CPU).")
    parser.add_argument("--window", type=int, default=1024, help="Tokens per window (default: %(default)s).")
    parser.add_argument("--chunk", type=int, default=256, help="Prefill chunk (default: %(default)s).")
    parser.add_argument("--variants", default="dense,fp8,w4a16,fp8-kv,fp8+fp8-kv",
                        help="Which rows, in order (w4a16 needs --w4a16; default: %(default)s).")
    parser.add_argument("--max-tokens", type=int, help="Use only the text's first N tokens (default: all).")
    parser.add_argument("--out", help="Write the rows and the environment as JSON here.")
    args = parser.parse_args()
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    model = args.model or builtin_model_path()
    folder = dense_folder(model, args.work_dir)
    tokens = load_tokenizer(str(folder)).encode(TEXT.read_text(encoding="utf-8"))[: args.max_tokens]
    variants = {
        "dense": [Variant(dtype, folder)],
        "fp8": [Variant("FP8 (online, per-channel weights, per-token activations)", folder, quantization="fp8")],
        "w4a16": [Variant(f"W4A16 ({checkpoint.name})", checkpoint) for checkpoint in args.w4a16],
        "fp8-kv": [Variant(f"{dtype} + FP8 KV cache", folder, kv_cache_dtype="fp8")],
        "fp8+fp8-kv": [Variant("FP8 weights + FP8 KV cache", folder, quantization="fp8", kv_cache_dtype="fp8")],
    }
    chosen = [variant for key in args.variants.split(",") for variant in variants[key]]
    rows = []
    for variant in chosen:
        rows.append(perplexity(variant, tokens, args.window, args.chunk, args.device, dtype))
        print(f"{variant.name}: perplexity {rows[-1]['perplexity']:.4f}", flush=True)
    if chosen[0] is variants["dense"][0]:
        for row in rows:
            row["vs_dense_%"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    print_table(rows, f"Perplexity on {TEXT.name} ({len(tokens)} tokens, windows of {args.window}, "
                      f"chunks of {args.chunk}), {folder.name} on {args.device}")
    save_json(args.out, {"model": str(model), "text": TEXT.name, "window": args.window, "chunk": args.chunk,
                         "rows": rows})


if __name__ == "__main__":
    main()
