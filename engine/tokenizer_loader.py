"""Load the tokenizer (and its chat template) of a model folder, a GGUF file, or a separate tokenizer.

A GGUF file carries its tokenizer in its metadata (`tokenizer.ggml.*`, and the
chat template in `tokenizer.chat_template`); transformers builds a fast
tokenizer from it offline, so, as in vLLM, `--tokenizer` is only needed to
override it.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.errors import ModelLoadError
from engine.gguf_metadata import is_gguf_file


def load_tokenizer(model: str, tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """`tokenizer` (a folder or Hub id) when given, else the model's own: its folder's files or its GGUF metadata."""
    source = tokenizer or model
    try:
        if is_gguf_file(source):
            path = Path(source)
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises many types for missing or corrupt files
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {error}") from error
