"""Model shapes the factory can build: tiny ones for tests, real ones for GPU benchmarks.

Each shape is the keyword arguments of the transformers config class of its
family. Real shapes copy the published configs (hidden sizes, heads, rope
scaling); only the vocabulary of the tokenizer is smaller than the model's, as
padded vocabularies are in real models.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

FAMILIES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "llama": (LlamaConfig, "LlamaForCausalLM"),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
    "mistral": (MistralConfig, "MistralForCausalLM"),
}

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _llama3_rope(factor: float, original: int) -> dict[str, Any]:
    return dict(rope_type="llama3", rope_theta=500000.0, factor=factor, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=original)


def _llama31(hidden: int, intermediate: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                rope_parameters=_llama3_rope(8.0, 8192))


# vocab_size None: exactly the tokenizer's vocabulary.
SHAPES: dict[tuple[str, str], dict[str, Any]] = {
    # llama3 rope scaling with a small original context so all three frequency bands occur at head_dim 16.
    ("llama", "tiny"): dict(_TINY, vocab_size=None, rms_norm_eps=1e-5, max_position_embeddings=4096,
                            tie_word_embeddings=False, rope_parameters=_llama3_rope(8.0, 1024)),
    ("qwen2", "tiny"): dict(_TINY, vocab_size=None, rms_norm_eps=1e-6, max_position_embeddings=4096,
                            tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    # head_dim 32 != hidden / heads (as in Mistral NeMo) to exercise the explicit head_dim key.
    ("mistral", "tiny"): dict(_TINY, head_dim=32, vocab_size=None, rms_norm_eps=1e-5, max_position_embeddings=4096,
                              tie_word_embeddings=False, sliding_window=None,
                              rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ("llama", "llama-3.2-1b"): dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                    rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
                                    rope_parameters=_llama3_rope(32.0, 8192)),
    ("llama", "llama-3.1-8b"): _llama31(4096, 14336, 32, 32),
    ("llama", "llama-3.1-70b"): _llama31(8192, 28672, 80, 64),
    ("qwen2", "qwen2.5-0.5b"): dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                    rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
                                    sliding_window=32768, use_sliding_window=False, max_window_layers=21,
                                    rope_parameters=dict(rope_type="default", rope_theta=1e6)),
}


def shape_kwargs(family: str, size: str) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {', '.join(FAMILIES)}")
    if (family, size) not in SHAPES:
        valid = ", ".join(f"{f}/{s}" for f, s in SHAPES)
        raise ValueError(f"no {size!r} shape for family {family!r}; valid family/size pairs: {valid}")
    return dict(SHAPES[(family, size)])
