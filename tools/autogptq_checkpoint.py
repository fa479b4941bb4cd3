"""Quantize a model folder with AutoGPTQ itself, on CPU (tool venv, see below).

    python tools/autogptq_checkpoint.py SOURCE TARGET [--group-size G] [--desc-act] [--dtype D] \\
        [--calibration-text FILE]

GPTQ, 4 bits, symmetric, with AutoGPTQ's defaults (damp_percent 0.01, true_sequential, static_groups false, the
model in float16 unless --dtype float32), groups of G input features (default 128, AutoGPTQ's), act order
(desc_act) off unless --desc-act. Writes what AutoGPTQ's save_quantized writes: gptq_model-4bit-<G>g.safetensors
(qweight/qzeros/scales/g_idx, zeros stored as z - 1; also an all-zero bias per quantized layer), config.json with
quantization_config, quantize_config.json. Calibration: FILE's tokens in samples of 128
(tools/calibration.py, the samples the other GPTQ/AWQ tools use); without FILE, random token ids.

Tool venv (auto-gptq 0.7.1 is the last release; it imports with transformers 4.51.3 and peft 0.10.0, not later):
    python3 -m venv /tmp/gptq && /tmp/gptq/bin/pip install torch==2.13.0 transformers==4.51.3 accelerate \\
        safetensors numpy setuptools wheel && \\
        BUILD_CUDA_EXT=0 /tmp/gptq/bin/pip install --no-build-isolation auto-gptq==0.7.1 && \\
        /tmp/gptq/bin/pip install peft==0.10.0

AutoGPTQ 0.7.1 quantizes on "cuda:0" only: from_pretrained refuses without CUDA, quantize moves each layer to
auto_gptq.modeling._base.CUDA_0 and calls torch.cuda.synchronize(). run_on_cpu points that device at the CPU and
makes synchronize a no-op; the model is wrapped with LlamaGPTQForCausalLM's constructor instead of from_pretrained.
Packing already runs on CPU in AutoGPTQ ("so far can only pack layer on CPU"), so the written tensors are its own.

A folder written by transformers 5 keeps rope settings in `rope_parameters`, which 4.51 ignores (it would
silently use rope_theta 10,000): they are moved to 4.51's `rope_theta` / `rope_scaling` before loading, and
transformers 5's `dtype` is dropped (4.51 writes `torch_dtype`), so config.json reads as a transformers 4 one.
With --calibration-text the source's tokenizer must load under 4.51: a tokenizer_config.json naming transformers
5's TokenizersBackend fails ("does not exist"); PreTrainedTokenizerFast loads the same tokenizer.json.

    # tests/fixtures/autogptq/g32 and g32-desc-act (TINY: engine.testing.make_model_folder(TINY, family="llama");
    # run from /tmp so the repo's operator/ does not shadow the stdlib; REPO is the checkout). The fixtures keep
    # config.json, quantize_config.json and the safetensors file. Reruns give the same tensors.
    cd /tmp && python REPO/tools/autogptq_checkpoint.py TINY REPO/tests/fixtures/autogptq/g32 --group-size 32 \\
        --calibration-text REPO/benchmarks/data/calibration_gettysburg_and_novels.txt
    cd /tmp && python REPO/tools/autogptq_checkpoint.py TINY REPO/tests/fixtures/autogptq/g32-desc-act \\
        --group-size 32 --desc-act --calibration-text REPO/benchmarks/data/calibration_gettysburg_and_novels.txt
    # SmolLM2-135M-Instruct rows of benchmarks/RESULTS.md (DENSE: the float32 folder of benchmarks/perplexity.py)
    cd /tmp && python REPO/tools/autogptq_checkpoint.py DENSE smollm2-gptq-g64 --group-size 64 --dtype float32 \\
        --calibration-text REPO/benchmarks/data/calibration_gettysburg_and_novels.txt      # and with --desc-act
"""

import argparse

import torch
from calibration import RANDOM_SAMPLE_TOKENS, RANDOM_SAMPLES, copy_tokenizer_files, text_samples
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import auto_gptq.modeling._base as autogptq_base
from auto_gptq import BaseQuantizeConfig
from auto_gptq.modeling import LlamaGPTQForCausalLM


def run_on_cpu() -> None:
    autogptq_base.CUDA_0 = torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None


def transformers4_config(source: str) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(source)
    rope = getattr(config, "rope_parameters", None)
    if rope:
        config.rope_theta = rope["rope_theta"]
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        config.rope_scaling = scaling if scaling.get("rope_type", "default") != "default" else None
    for name in ("rope_parameters", "dtype"):  # transformers 5's names; 4.51 would save them beside its own
        if hasattr(config, name):
            delattr(config, name)
    return config


def calibration(source: str, text_file: str | None, vocab_size: int) -> list[dict[str, list[int]]]:
    if text_file:
        samples = text_samples(source, text_file)
    else:
        samples = torch.randint(3, vocab_size, (RANDOM_SAMPLES, RANDOM_SAMPLE_TOKENS)).tolist()
    return [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--desc-act", action="store_true",
                        help="Act order: quantize columns by falling Hessian diagonal (writes a shuffled g_idx).")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="The model's dtype while quantizing and as saved (float16: AutoGPTQ's default).")
    parser.add_argument("--calibration-text", help="Plain-text calibration file (default: random token ids).")
    args = parser.parse_args()
    torch.manual_seed(0)
    run_on_cpu()
    config = transformers4_config(args.source)
    model = AutoModelForCausalLM.from_pretrained(args.source, config=config, torch_dtype=getattr(torch, args.dtype))
    quantize_config = BaseQuantizeConfig(bits=4, group_size=args.group_size, desc_act=args.desc_act, sym=True)
    gptq = LlamaGPTQForCausalLM(model, False, quantize_config)
    gptq.quantize(calibration(args.source, args.calibration_text, config.vocab_size), use_cuda_fp16=False)
    gptq.save_quantized(args.target, use_safetensors=True)
    copy_tokenizer_files(args.source, args.target)


if __name__ == "__main__":
    main()
