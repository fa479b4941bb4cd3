"""kubellm's inference engine.

`from engine import LLM, SamplingParams` works as in vLLM. The heavy parts
(torch, transformers) load on first use, so importing a light module such as
engine.errors or engine.sampling stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "EngineStats": "engine.llm_engine",
    "EngineConfig": "engine.config",
    "SamplingParams": "engine.sampling",
    "BeamSearchParams": "engine.beam_search",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
