"""Quantize a model folder with llm-compressor itself (run in a tool venv: pip install torch==2.13.0 llmcompressor).

    python tools/llmcompressor_checkpoints.py SOURCE TARGET SCHEME [GROUP_SIZE] [CALIBRATION_TEXT]

SCHEME: fp8-dynamic (FP8 weights per channel, activations per token), fp8-dynamic-kv (the same plus
llm-compressor's FP8 kv_cache_scheme: per-layer k_scale / v_scale calibrated on random token ids), w4a16 (round-to-nearest
4-bit, symmetric), gptq-w4a16-asym-actorder-weight (GPTQ with zero points and act order,
act order "weight", calibrated on random token ids), gptq-w4a16 (GPTQ, symmetric, calibrated on
CALIBRATION_TEXT: a plain-text file, tokenized and cut into samples of 128 tokens). GROUP_SIZE defaults
to 32 so the tiny test models (64 hidden features) hold whole groups; SmolLM2-135M (576 hidden features)
takes 64; -1 is one scale per output channel. Writes compressed-tensors checkpoints with llm-compressor's
own save_pretrained, as published checkpoints are made.
"""

import sys

import torch
from calibration import TEXT_SAMPLE_TOKENS, copy_tokenizer_files, text_samples
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM


def group_scheme(symmetric: bool, group_size: int, actorder: str | None = None) -> dict:
    if group_size == -1:
        weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "channel"}
    else:
        weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}
    if actorder:
        weights["actorder"] = actorder
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def random_calibration(vocab_size: int) -> Dataset:
    ids = torch.randint(3, vocab_size, (16, 32)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 32] * 16})


def text_calibration(source: str, text_file: str) -> Dataset:
    samples = text_samples(source, text_file)
    return Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * TEXT_SAMPLE_TOKENS] * len(samples)})


def main(source: str, target: str, scheme: str, group_size: str = "32", calibration_text: str | None = None) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    calibration = None
    if scheme == "fp8-dynamic":
        recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"])
    elif scheme == "fp8-dynamic-kv":
        kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}
        recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=["lm_head"],
                                      kv_cache_scheme=kv_scheme)
        calibration = random_calibration(model.config.vocab_size)
    elif scheme == "w4a16":
        groups = group_scheme(symmetric=True, group_size=int(group_size))
        recipe = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
    elif scheme == "gptq-w4a16-asym-actorder-weight":
        groups = group_scheme(symmetric=False, group_size=int(group_size), actorder="weight")
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"])
        calibration = random_calibration(model.config.vocab_size)
    elif scheme == "gptq-w4a16":
        if calibration_text is None:
            raise SystemExit("gptq-w4a16 needs CALIBRATION_TEXT")
        recipe = GPTQModifier(config_groups=group_scheme(symmetric=True, group_size=int(group_size)), ignore=["lm_head"])
        calibration = text_calibration(source, calibration_text)
    else:
        raise SystemExit(f"unknown scheme {scheme}")
    if calibration is None:
        oneshot(model=model, recipe=recipe)
    else:
        oneshot(model=model, recipe=recipe, dataset=calibration, num_calibration_samples=len(calibration),
                max_seq_length=len(calibration[0]["input_ids"]))
    model.save_pretrained(target, save_compressed=True)
    copy_tokenizer_files(source, target)


if __name__ == "__main__":
    main(*sys.argv[1:])
