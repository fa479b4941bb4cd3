"""Quantize a model folder with AutoAWQ itself (tool venv: pip install torch==2.13.0 autoawq; runs on CPU).

    python tools/autoawq_checkpoint.py SOURCE TARGET

AWQ gemm, 4 bits, group 32 (the tiny test models have 64 hidden features), zero points,
calibrated on random token ids. Clipping is off: AutoAWQ's clip search needs output
channels in multiples of 64, and the tiny model's k/v projections have 32.
"""

import sys

import torch
from awq import AutoAWQForCausalLM
from transformers import AutoTokenizer


def main(source: str, target: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoAWQForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    calibration = torch.randint(3, 200, (32, 60), generator=torch.Generator().manual_seed(0)).tolist()
    model.quantize(tokenizer, quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
                   calib_data=calibration, max_calib_seq_len=64, apply_clip=False,
                   n_parallel_calib_samples=4, max_calib_samples=16)
    model.save_quantized(target)


if __name__ == "__main__":
    main(*sys.argv[1:])
