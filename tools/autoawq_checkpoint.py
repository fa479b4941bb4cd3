"""Quantize a model folder with AutoAWQ itself (tool venv: pip install torch==2.13.0 autoawq==0.2.9; on CPU).

    python tools/autoawq_checkpoint.py SOURCE TARGET [--group-size G] [--calibration-text FILE] [--no-clip]

AWQ "gemm", 4 bits, zero points (AutoAWQ's defaults), groups of G input features (default 128, AutoAWQ's;
it must divide every linear layer's input features: SmolLM2-135M's 576 hidden features take 64 or 32).
Calibration: FILE's tokens in samples of 128 (tools/calibration.py, the same samples the GPTQ
checkpoints of tools/llmcompressor_checkpoints.py use); without FILE, random token ids. AutoAWQ's
default calibration set (pile-val on the Hugging Face Hub) is not used: it needs the network.
--no-clip turns AutoAWQ's clip search off; it needs output channels in multiples of 64.

AutoAWQ 0.2.9 corrupts the weights when it runs on CPU; CpuSafeAwqQuantizer corrects that (it overrides a
private method of 0.2.9, the last release: keep the pin). With it the SmolLM2 g64 --no-clip checkpoint is the
same, tensor for tensor, under transformers 5.17 and 4.51.3 (AutoAWQ's last tested version). Under transformers 4
a folder that transformers 5 wrote needs `rope_theta` at the top of config.json (4.51 ignores `rope_parameters`
and silently uses 10,000) and a tokenizer_class it knows (PreTrainedTokenizerFast, not TokenizersBackend).

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
from awq.quantize.quantizer import AwqQuantizer
from calibration import RANDOM_SAMPLE_TOKENS, RANDOM_SAMPLES, TEXT_SAMPLE_TOKENS, copy_tokenizer_files, text_samples
from transformers import AutoTokenizer


class CpuSafeAwqQuantizer(AwqQuantizer):
    """AutoAWQ's quantizer with a scale search that leaves the weights as it found them on CPU too.

    AutoAWQ 0.2.9's `_compute_best_scale` keeps the weights to restore as `{k: v.cpu() for k, v in
    module.state_dict().items()}`. On a GPU `.cpu()` copies; on CPU it returns the live tensor, so the first
    grid point's in-place `weight.mul_(scales)` writes into that snapshot. Every later grid point is then
    measured on, and the search ends by restoring, weights already multiplied by the first grid point's
    scales, and `apply_scale` multiplies them by the chosen scales again, uncompensated (SmolLM2-135M: error
    0.62 after layer 0 from the scales alone, no rounding; perplexity 278,456). A copied snapshot fixes it.
    """

    def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, *args, **kwargs):
        module_state_dict = type(module2inspect).state_dict
        module2inspect.state_dict = lambda: {k: v.clone() for k, v in module_state_dict(module2inspect).items()}
        try:
            return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, *args, **kwargs)
        finally:
            del module2inspect.state_dict


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
                   n_parallel_calib_samples=4, max_calib_samples=samples, quantizer_cls=CpuSafeAwqQuantizer)
    model.save_quantized(args.target)
    copy_tokenizer_files(args.source, args.target)


if __name__ == "__main__":
    main()
