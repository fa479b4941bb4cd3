"""The Llama decoder, also serving Mistral, Qwen2, Qwen3 and the MoE families Mixtral and Qwen3-MoE.

ModelConfig resolves their differences: biases, per-head q/k RMSNorm (Qwen3),
per-layer sliding windows (Mistral), and sparse expert MLPs in place of the
dense one (Mixtral, Qwen3-MoE).

Modules are named like the Hugging Face checkpoint's tensors, except the fused
ones: q/k/v_proj -> qkv_proj and gate/up_proj -> gate_up_proj
(`packed_modules_mapping` tells the loader), and the experts, stacked into
two parameters per layer (`expert_projections`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.activation import GATED_ACTIVATIONS
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.moe import MIXTRAL_EXPERT_PROJECTIONS, QWEN_EXPERT_PROJECTIONS, ExpertProjections, SparseMoeBlock
from engine.layers.quantization.fp8_activation import LinearInput
from engine.layers.rotary_embedding import RotaryEmbedding, apply_rotary
from engine.model_config import ModelConfig


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, norm_class: type[RMSNorm] = RMSNorm):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            config.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.qkv_bias,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * config.head_dim, config.hidden_size, bias=config.o_proj_bias
        )
        self.qk_norm = config.qk_norm  # Qwen3, Gemma 3: RMSNorm over each head's q and k before the rotary
        if self.qk_norm:
            self.q_norm = norm_class(config.head_dim, config.rms_norm_eps)
            self.k_norm = norm_class(config.head_dim, config.rms_norm_eps)
        qkv = self.qkv_proj
        scale = config.attention_scale or config.head_dim**-0.5
        self.attn = Attention(qkv.num_heads, qkv.num_kv_heads, config.head_dim, scale=scale,
                              sliding_window=config.layer_windows[layer_index])

    def forward(
        self, hidden: LinearInput, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        num_heads, num_kv_heads, head_dim = self.attn.num_heads, self.attn.num_kv_heads, self.attn.head_dim
        qk_size = self.qkv_proj.q_size + self.qkv_proj.kv_size
        qk = qkv[:, :qk_size].view(-1, num_heads + num_kv_heads, head_dim)
        if self.qk_norm:
            q, k = qk.split([num_heads, num_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        # q and k are rotated together: one set of elementwise kernels per layer instead of two.
        q, k = apply_rotary(qk, cos, sin).split([num_heads, num_kv_heads], dim=1)
        v = qkv[:, qk_size:].view(-1, num_kv_heads, head_dim)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias=config.mlp_bias)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=config.mlp_bias)
        activation = GATED_ACTIVATIONS[config.hidden_act]
        # SiLU-and-mul quantizes its output for an FP8 down_proj in its own launch (GeGLU has no kernel).
        self.act_fn = activation(fp8_output=activation.fused_on_cuda and self.down_proj.takes_fp8_activation)

    def forward(self, x: LinearInput) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


def enter_layer(
    input_layernorm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None
) -> tuple[LinearInput, torch.Tensor]:
    """(normed input, residual stream): the first layer starts the stream, later ones add the last output to it."""
    if residual is None:
        return input_layernorm(hidden), hidden
    return input_layernorm(hidden, residual)


# Where a family's checkpoint keeps a layer's MLP, when not under `mlp`.
MLP_MODULE_NAME = {"MixtralForCausalLM": "block_sparse_moe"}


def make_mlp(config: ModelConfig, layer_index: int) -> nn.Module:
    """The layer's experts when it is sparse, else the dense gated MLP."""
    if config.moe is not None and config.moe.sparse_layers[layer_index]:
        return SparseMoeBlock(config.moe, config.hidden_size)
    return LlamaMLP(config)


class LlamaDecoderLayer(nn.Module):
    """Where the projection after a norm takes FP8 activations quantized per token (qkv_proj; a dense
    MLP's gate_up_proj, not the experts' router), the norm quantizes its output for it in its own launch.
    """

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index)
        self.mlp_name = MLP_MODULE_NAME.get(config.architecture, "mlp")
        mlp = make_mlp(config, layer_index)
        self.add_module(self.mlp_name, mlp)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(size, eps, fp8_output=self.self_attn.qkv_proj.takes_fp8_activation)
        mlp_takes_fp8 = isinstance(mlp, LlamaMLP) and mlp.gate_up_proj.takes_fp8_activation
        self.post_attention_layernorm = RMSNorm(size, eps, fp8_output=mlp_takes_fp8)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = enter_layer(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return getattr(self, self.mlp_name)(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary_emb(positions, hidden.dtype)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # checkpoint module name -> (fused module name, shard id passed to its weight_loader)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    expert_projections: ExpertProjections = QWEN_EXPERT_PROJECTIONS
    base_model_class: type[nn.Module] = LlamaModel

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.base_model_class(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_metadata: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> float32 logits [N, vocab_size]."""
        return self.lm_head(hidden).float()

    def attention_layers(self) -> Iterator[Attention]:
        for layer in self.model.layers:
            yield layer.self_attn.attn

    def bind_kv_cache(self, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Give layer i its (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]."""
        layers = list(self.attention_layers())
        if len(kv_caches) != len(layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(layers)} attention layers")
        for attn, (k_cache, v_cache) in zip(layers, kv_caches):
            attn.k_cache, attn.v_cache = k_cache, v_cache


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral names its expert projections w1 (gate), w3 (up) and w2 (down)."""

    expert_projections = MIXTRAL_EXPERT_PROJECTIONS
