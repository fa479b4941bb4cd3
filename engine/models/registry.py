"""config.json architecture name -> model class."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM

# Mistral (no biases) and Qwen2 (q/k/v biases, tied embeddings in small sizes) are
# Llama-shaped; ModelConfig carries their differences, so one class serves all three.
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
