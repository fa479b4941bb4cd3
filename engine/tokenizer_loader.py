"""Load the tokenizer (and its chat template) of a model folder, a GGUF file, or a separate tokenizer.

A GGUF file carries its tokenizer in its metadata (`tokenizer.ggml.*`, and the
chat template in `tokenizer.chat_template`); transformers builds a fast
tokenizer from it offline, so, as in vLLM, `--tokenizer` is only needed to
override it. That conversion parses tens of thousands of strings (seconds,
every start), so its result is saved once in the cache directory, keyed by the
file's path, size and modification time and the transformers version.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.cache_dir import cache_dir
from engine.errors import ModelLoadError
from engine.gguf_metadata import is_gguf_file


def load_tokenizer(model: str, tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """`tokenizer` (a folder or Hub id) when given, else the model's own: its folder's files or its GGUF metadata."""
    source = tokenizer or model
    try:
        if is_gguf_file(source):
            return _gguf_tokenizer(Path(source))
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:  # transformers raises many types for missing or corrupt files
        raise ModelLoadError(f"cannot load the tokenizer of {source}: {error}") from error


def gguf_tokenizer_cache(file: Path) -> Path:
    """The folder that holds the tokenizer converted from this GGUF file (as it is now)."""
    stat = file.stat()
    key = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    return cache_dir() / "gguf-tokenizers" / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _gguf_tokenizer(file: Path) -> PreTrainedTokenizerBase:
    """The converted tokenizer from the cache, else converted now and saved (written aside, then renamed in)."""
    target = gguf_tokenizer_cache(file)
    if target.is_dir():
        return AutoTokenizer.from_pretrained(str(target))
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    _save(tokenizer, target)
    return tokenizer


def _save(tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    except OSError:
        return  # a read-only cache: the file is converted again next time
    try:
        tokenizer.save_pretrained(str(staging))
        os.rename(staging, target)
    except OSError:
        pass  # another process saved the same tokenizer first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
