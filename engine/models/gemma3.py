"""Gemma 3 text decoder (Gemma3ForCausalLM: the 270M and 1B checkpoints).

What differs from Llama: embeddings scaled by sqrt(hidden_size); GeGLU MLP
(tanh-approximated gelu); RMSNorm scaling by (1 + w), also over each head's q
and k; four norms per layer (the attention and MLP outputs are normed before
the residual add); attention scaled by query_pre_attn_scalar ** -0.5; and
local sliding-window layers interleaved with global ones, each kind with its
own rotary embedding (local: rope_local_base_freq, unscaled; global:
rope_theta with the checkpoint's rope scaling).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.embedding import VocabParallelEmbedding
from engine.layers.layernorm import GemmaRMSNorm
from engine.layers.rotary_embedding import RotaryEmbedding
from engine.model_config import ModelConfig
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, enter_layer

CosSin = tuple[torch.Tensor, torch.Tensor]


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.is_sliding = config.layer_windows[layer_index] is not None
        self.self_attn = LlamaAttention(config, layer_index, norm_class=GemmaRMSNorm)
        self.mlp = LlamaMLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        global_rope: CosSin,
        local_rope: CosSin,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next layer adds the two."""
        hidden, residual = enter_layer(self.input_layernorm, hidden, residual)
        cos, sin = local_rope if self.is_sliding else global_rope
        hidden = self.post_attention_layernorm(self.self_attn(hidden, cos, sin, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.local_rope is not None, "Gemma 3 configs always carry the local layers' rope"
        # sqrt(hidden_size) rounded to the model's dtype, as transformers does (55.5, not 55.4256, in bf16).
        normalizer = torch.tensor(config.hidden_size**0.5, dtype=torch.float32).to(torch.get_default_dtype())
        self.register_buffer("normalizer", normalizer, persistent=False)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope)
        self.rotary_emb_local = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.local_rope)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.normalizer
        global_rope = self.rotary_emb(positions, hidden.dtype)
        local_rope = self.rotary_emb_local(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, global_rope, local_rope, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma3ForCausalLM(LlamaForCausalLM):
    base_model_class = Gemma3Model
