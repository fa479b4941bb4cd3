"""Model shapes the factory can build: tiny ones for tests, real ones for GPU benchmarks.

Each shape is the keyword arguments of the transformers config class of its
family. Real shapes copy the published configs (hidden sizes, heads, rope
scaling); only the vocabulary of the tokenizer is smaller than the model's, as
padded vocabularies are in real models.
"""

from __future__ import annotations

from typing import Any

from transformers import (
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

FAMILIES: dict[str, tuple[type[PretrainedConfig], str]] = {
    "llama": (LlamaConfig, "LlamaForCausalLM"),
    "qwen2": (Qwen2Config, "Qwen2ForCausalLM"),
    "mistral": (MistralConfig, "MistralForCausalLM"),
    "qwen3": (Qwen3Config, "Qwen3ForCausalLM"),
    "qwen3_moe": (Qwen3MoeConfig, "Qwen3MoeForCausalLM"),
    "mixtral": (MixtralConfig, "MixtralForCausalLM"),
    "gemma3": (Gemma3TextConfig, "Gemma3ForCausalLM"),
}

_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
_QWEN3_ROPE = dict(rope_type="default", rope_theta=1e6)


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
    # A window of 8 tokens, so prompts in tests run far past it.
    ("mistral", "tiny-sliding-window"): dict(_TINY, head_dim=32, vocab_size=None, rms_norm_eps=1e-5,
                                             max_position_embeddings=4096, tie_word_embeddings=False,
                                             sliding_window=8, rope_parameters=dict(rope_type="default",
                                                                                    rope_theta=1e4)),
    ("qwen3", "tiny"): dict(_TINY, head_dim=32, vocab_size=None, rms_norm_eps=1e-6, max_position_embeddings=4096,
                            tie_word_embeddings=True, rope_parameters=_QWEN3_ROPE),
    # Layer 1 is dense (mlp_only_layers), so both kinds of MLP are exercised; 8 experts, top 2.
    ("qwen3_moe", "tiny"): dict(_TINY, head_dim=32, vocab_size=None, rms_norm_eps=1e-6, max_position_embeddings=4096,
                                tie_word_embeddings=False, rope_parameters=_QWEN3_ROPE, num_experts=8,
                                num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                mlp_only_layers=[1]),
    ("mixtral", "tiny"): dict(_TINY, intermediate_size=64, vocab_size=None, rms_norm_eps=1e-5,
                              max_position_embeddings=4096, tie_word_embeddings=False, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=None,
                              rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    # Two local layers (window 8) then a global one with linear rope scaling, as Gemma 3 4B+ scale it;
    # query_pre_attn_scalar differs from head_dim to exercise it.
    ("gemma3", "tiny"): dict(_TINY, num_hidden_layers=3, head_dim=32, vocab_size=None, rms_norm_eps=1e-6,
                             max_position_embeddings=4096, tie_word_embeddings=True, sliding_window=8,
                             query_pre_attn_scalar=24,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                             rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=1e4),
                                              "full_attention": dict(rope_type="linear", factor=8.0,
                                                                     rope_theta=1e6)}),
    ("qwen3", "qwen3-8b"): dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                rms_norm_eps=1e-6, max_position_embeddings=40960, tie_word_embeddings=False,
                                rope_parameters=_QWEN3_ROPE),
    ("qwen3_moe", "qwen3-30b-a3b"): dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                         num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                         vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=40960,
                                         tie_word_embeddings=False, rope_parameters=_QWEN3_ROPE, num_experts=128,
                                         num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True),
    ("mixtral", "mixtral-8x7b"): dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                      rms_norm_eps=1e-5, max_position_embeddings=32768, tie_word_embeddings=False,
                                      num_local_experts=8, num_experts_per_tok=2, sliding_window=None,
                                      rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    ("gemma3", "gemma-3-270m"): dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                     rms_norm_eps=1e-6, max_position_embeddings=32768, tie_word_embeddings=True,
                                     sliding_window=512, query_pre_attn_scalar=256,
                                     layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                                  for i in range(18)],
                                     rope_parameters={"sliding_attention": dict(rope_type="default", rope_theta=1e4),
                                                      "full_attention": dict(rope_type="default", rope_theta=1e6)}),
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
