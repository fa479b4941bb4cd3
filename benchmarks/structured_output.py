"""Per-step cost of JSON-schema structured outputs on the grammar side, at a given batch size.

Each step does what the engine will do for a batch where every sequence has a
JSON schema: fill the batch's token bitmask (CPU, xgrammar), apply it to the
step's logits on the device, take the best allowed token per row and advance
each matcher. Logits are random, so sequences wander through the schema the way
sampling does. This is the overhead the sampler integration has to hide behind
the forward pass (fill) or pay on the device (apply); the end-to-end decode
overhead can only be measured once the engine applies the masks.

    python -m benchmarks.structured_output --tokenizer MODEL_FOLDER --batch 32 --device cuda --out results/so.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoTokenizer

from benchmarks.common import print_table, save_json
from engine.structured_output import (
    GrammarCompiler,
    RequestGrammar,
    StructuredOutputSpec,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmask,
)

# A typical tool-argument / extraction schema: nested object, enum, array, numbers, free strings.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}


def run(tokenizer_folder: str, batch: int, steps: int, device: str, seed: int) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    vocab_size = len(tokenizer)
    compiler = GrammarCompiler(tokenizer, vocab_size, [tokenizer.eos_token_id])
    spec = StructuredOutputSpec.json_schema(SCHEMA, "response_format")
    started = time.perf_counter()
    compiled = compiler.compile(spec)
    compile_ms = (time.perf_counter() - started) * 1e3
    grammars: list[RequestGrammar | None] = [RequestGrammar(compiled) for _ in range(batch)]
    bitmask = allocate_bitmask(batch, vocab_size)
    generator = torch.Generator(device).manual_seed(seed)
    fill_ms, apply_ms = [], []
    for _ in range(steps):
        logits = torch.randn(batch, vocab_size, device=device, generator=generator)
        started = time.perf_counter()
        fill_bitmask(grammars, bitmask)
        fill_ms.append((time.perf_counter() - started) * 1e3)
        _synchronize(device)
        started = time.perf_counter()
        apply_bitmask(logits, bitmask)
        _synchronize(device)
        apply_ms.append((time.perf_counter() - started) * 1e3)
        tokens = logits.argmax(dim=-1).tolist()
        for row, grammar in enumerate(grammars):
            if grammar is not None:
                grammar.accept(tokens[row])
                if grammar.is_terminated:  # a finished sequence is replaced by a new request
                    grammars[row] = RequestGrammar(compiled)
    return {"batch": batch, "vocab": vocab_size, "device": device, "steps": steps,
            "compile_ms": round(compile_ms, 2),
            "fill_ms_median": round(statistics.median(fill_ms), 3), "fill_ms_p99": round(_p99(fill_ms), 3),
            "apply_ms_median": round(statistics.median(apply_ms), 3), "apply_ms_p99": round(_p99(apply_ms), 3)}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="A model folder with a Hugging Face tokenizer.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Write the result as JSON here.")
    args = parser.parse_args()
    row = run(args.tokenizer, args.batch, args.steps, args.device, args.seed)
    print_table([row], "JSON-schema structured outputs: grammar-side cost per decode step")
    save_json(args.out, {"rows": [row]})


if __name__ == "__main__":
    main()
