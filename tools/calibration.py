"""What the quantization tools share: text calibration samples and the tokenizer files a checkpoint carries.

Imported by tools/llmcompressor_checkpoints.py, tools/autoawq_checkpoint.py and tools/autogptq_checkpoint.py
(run as scripts, so this folder is on sys.path), so that GPTQ and AWQ checkpoints calibrate on the same tokens.
"""

import shutil
from pathlib import Path

TEXT_SAMPLE_TOKENS = 128
RANDOM_SAMPLES, RANDOM_SAMPLE_TOKENS = 16, 64  # the AWQ and AutoGPTQ tools' calibration without a text file


def text_samples(source: str, text_file: str) -> list[list[int]]:
    """The text's tokens (the source model's tokenizer) cut into samples of TEXT_SAMPLE_TOKENS, the last, shorter
    piece dropped."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(Path(text_file).read_text(encoding="utf-8"))["input_ids"]
    samples = [ids[i : i + TEXT_SAMPLE_TOKENS] for i in range(0, len(ids) - TEXT_SAMPLE_TOKENS + 1, TEXT_SAMPLE_TOKENS)]
    print(f"calibration: {len(samples)} samples of {TEXT_SAMPLE_TOKENS} tokens from {text_file}")
    return samples


def copy_tokenizer_files(source: str, target: str) -> None:
    """The source folder's tokenizer, chat template and generation config, which the quantizers do not write."""
    for item in Path(source).iterdir():
        if "token" in item.name or item.name in ("generation_config.json", "chat_template.jinja"):
            shutil.copy2(item, Path(target) / item.name)
