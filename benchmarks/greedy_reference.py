"""Greedy text of kubellm against transformers on the same checkpoint and prompts: equal, or where it parts.

The reference model is benchmarks/perplexity_reference.py's (transformers loading the folder itself,
or on weights it dequantizes independently of the engine, as for AutoAWQ checkpoints). Both sides get
the same prompt token ids (the engine's tokenizer) and run in float32 on the CPU.

    python -m benchmarks.greedy_reference smollm2-awq-g64 --max-tokens 32 --out results/greedy_awq.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.common import save_json
from benchmarks.perplexity_reference import load_checkpoint
from engine import LLM, SamplingParams
from engine.tokenizer_loader import load_tokenizer

PROMPTS = (
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "Q: What is 12 times 7?\nA:",
    "The three branches of the United States government are",
    "Once upon a time, in a small village,",
)


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """The first position where the token ids differ (None: equal)."""
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None if ours == theirs else
                min(len(ours), len(theirs)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out")
    args = parser.parse_args()

    tokenizer = load_tokenizer(str(args.folder))
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    llm = LLM(model=str(args.folder), device="cpu", dtype="float32", num_kv_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    ours = [out.outputs[0].token_ids for out in
            llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)]
    model = load_checkpoint(args.folder)
    model.generation_config.eos_token_id = None
    rows = []
    with torch.inference_mode():
        for text, ids, engine_ids in zip(PROMPTS, prompts, ours):
            generated = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=args.max_tokens, do_sample=False)
            reference_ids = generated[0, len(ids):].tolist()
            rows.append({"prompt": text, "equal": engine_ids == reference_ids,
                         "first_difference": first_difference(list(engine_ids), reference_ids),
                         "kubellm": tokenizer.decode(engine_ids), "transformers": tokenizer.decode(reference_ids)})
            print(f"{text!r}: {'equal' if rows[-1]['equal'] else 'differs at ' + str(rows[-1]['first_difference'])}"
                  f"\n  kubellm:      {rows[-1]['kubellm']!r}\n  transformers: {rows[-1]['transformers']!r}", flush=True)
    print(f"{sum(row['equal'] for row in rows)}/{len(rows)} prompts equal over {args.max_tokens} greedy tokens")
    save_json(args.out, {"folder": str(args.folder), "max_tokens": args.max_tokens, "rows": rows})


if __name__ == "__main__":
    main()
