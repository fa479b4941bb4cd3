"""Quantize a model folder with AutoAWQ itself (tool venv: pip install torch==2.13.0 autoawq; runs on CPU).

    python tools/autoawq_checkpoint.py SOURCE TARGET [--group-size G] [--calibration-text FILE] [--no-clip]

AWQ "gemm", 4 bits, zero points (AutoAWQ's defaults), groups of G input features (default 128, AutoAWQ's;
it must divide every linear layer's input features: SmolLM2-135M's 576 hidden features take 64 or 32).
Calibration: FILE's tokens in samples of 128 (tools/calibration.py, the same samples the GPTQ
checkpoints of tools/llmcompressor_checkpoints.py use); without FILE, random token ids. AutoAWQ's
default calibration set (pile-val on the Hugging Face Hub) is not used: it needs the network.
--no-clip turns AutoAWQ's clip search off; it needs output channels in multiples of 64.

    # tests/fixtures/autoawq/gemm-g32 (the tiny Llama: 64 hidden features, k/v projections of 32):
    python tools/autoawq_checkpoint.py TINY tests/fixtures/autoawq/gemm-g32 --group-size 32 --no-clip
    # SmolLM2-135M-Instruct (DENSE: the float32 folder benchmarks/perplexity.py writes):
    python tools/autoawq_checkpoint.py DENSE smollm2-awq-g64 --group-size 64 \\
        --calibration-text benchmarks/data/calibration_gettysburg_and_novels.txt
"""

import argparse
import json
from pathlib import Path

import torch
from awq import AutoAWQForCausalLM
from calibration import TEXT_SAMPLE_TOKENS, copy_tokenizer_files, text_samples
from transformers import AutoTokenizer

RANDOM_SAMPLES, RANDOM_SAMPLE_TOKENS = 16, 64


def check_group_size(source: str, group_size: int) -> None:
    config = json.loads((Path(source) / "config.json").read_text())
    for name in ("hidden_size", "intermediate_size"):
        if config[name] % group_size:
            raise SystemExit(f"group size {group_size} does not divide {name} {config[name]} of {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration-text", help="Plain-text calibration file (default: random token ids).")
    parser.add_argument("--no-clip", action="store_true", help="Skip AutoAWQ's clip search.")
    args = parser.parse_args()
    check_group_size(args.source, args.group_size)

    tokenizer = AutoTokenizer.from_pretrained(args.source)
    model = AutoAWQForCausalLM.from_pretrained(args.source, torch_dtype=torch.float32)
    if args.calibration_text:
        calibration = text_samples(args.source, args.calibration_text)
        samples, sample_tokens = len(calibration), TEXT_SAMPLE_TOKENS
    else:  # AutoAWQ concatenates the first `samples` and re-cuts them into pieces of `sample_tokens`
        calibration = torch.randint(3, 200, (32, 60), generator=torch.Generator().manual_seed(0)).tolist()
        samples, sample_tokens = RANDOM_SAMPLES, RANDOM_SAMPLE_TOKENS
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": args.group_size, "w_bit": 4,
                                            "version": "GEMM"},
                   calib_data=calibration, max_calib_seq_len=sample_tokens, apply_clip=not args.no_clip,
                   n_parallel_calib_samples=4, max_calib_samples=samples)
    model.save_quantized(args.target)
    copy_tokenizer_files(args.source, args.target)


if __name__ == "__main__":
    main()
