"""config.json architecture name -> model class."""

from __future__ import annotations

from torch import nn

from engine.models.gemma3 import Gemma3ForCausalLM
from engine.models.llama import LlamaForCausalLM, MixtralForCausalLM

# Mistral (no biases), Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Qwen3-MoE (experts) are
# Llama-shaped; ModelConfig carries their differences, so one class serves them all.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
}
