"""The model's own sampling defaults from generation_config.json, for requests that leave them unset.

An Instruct model's generation_config.json often carries the sampling its
authors tuned (Qwen2.5: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty
1.05). transformers' generate applies them, and so does vLLM since 0.8
(`--generation-config auto`); without them kubellm would sample the same model
differently. `--generation-config vllm` turns them off (vLLM's own defaults),
a folder reads generation_config.json from there instead of the model folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError, InvalidRequestError, ModelLoadError
from engine.model_config import read_json_object
from engine.sampling import SamplingParams

# generation_config.json keys that are SamplingParams fields of the same name.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# The --generation-config values that are not folders.
AUTO, NONE = "auto", "vllm"


@dataclass(frozen=True)
class SamplingDefaults:
    sampling: dict[str, float | int] = field(default_factory=dict)  # SAMPLING_KEYS the file sets
    max_tokens: int | None = None  # generation_config.json's max_new_tokens


def load_sampling_defaults(model_folder: str, source: str = AUTO) -> SamplingDefaults:
    """The defaults `--generation-config source` selects; a bad file is a ConfigError naming it."""
    if source == NONE:
        return SamplingDefaults()
    path = Path(model_folder if source == AUTO else source) / "generation_config.json"
    if not path.is_file():
        if source == AUTO:  # many models ship none
            return SamplingDefaults()
        raise ConfigError(f"--generation-config {source}: {path} does not exist")
    try:
        raw = read_json_object(path)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    sampling = {key: raw[key] for key in SAMPLING_KEYS if raw.get(key) is not None}
    max_tokens = raw.get("max_new_tokens")
    try:
        SamplingParams(max_tokens=max_tokens, **sampling)
    except (InvalidRequestError, TypeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return SamplingDefaults(sampling, max_tokens)
