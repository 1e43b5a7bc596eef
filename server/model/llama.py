"""Llama-family decoder; Mistral, Qwen2 and Qwen3 reuse it with small variations.

Module names mirror the Hugging Face checkpoints, except that q/k/v and gate/up are
packed into qkv_proj and gate_up_proj (the loader fills them shard by shard).
"""

from __future__ import annotations

import torch
from torch import nn

from server.model.attn_metadata import AttentionMetadata
from server.model.hf_config import ModelArchConfig
from server.model.layers.activation import SiluAndMul
from server.model.layers.attention import Attention
from server.model.layers.attention_backend import AttentionBackend, get_attention_backend
from server.model.layers.embedding import VocabEmbedding
from server.model.layers.linear import Linear
from server.model.layers.norm import RMSNorm
from server.model.layers.rotary import RotaryEmbedding
from server.model.quantization import QuantConfig


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        inter = arch.intermediate_size
        self.gate_up_proj = Linear(arch.hidden_size, [inter, inter], bias=arch.mlp_bias,
                                   shard_names=("gate_proj", "up_proj"), dtype=dtype,
                                   quant=quant)
        self.down_proj = Linear(inter, arch.hidden_size, bias=arch.mlp_bias, dtype=dtype,
                                quant=quant)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArchConfig, layer: int, rotary_emb: RotaryEmbedding,
                 backend: AttentionBackend, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.head_dim = arch.head_dim
        self.sizes = [arch.q_size, arch.kv_size, arch.kv_size]
        self.qkv_proj = Linear(arch.hidden_size, self.sizes, bias=arch.attention_bias,
                               shard_names=("q_proj", "k_proj", "v_proj"), dtype=dtype,
                               quant=quant)
        self.o_proj = Linear(arch.q_size, arch.hidden_size, bias=arch.o_proj_bias, dtype=dtype,
                             quant=quant)
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(arch.num_heads, arch.num_kv_heads, arch.head_dim, backend,
                              sliding_window=arch.layer_sliding_window(layer))

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for per-head q/k norms (Qwen3); identity here."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchConfig, self_attn: nn.Module, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = LlamaMLP(arch, dtype, quant)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, the residual stream before it) for the next norm."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, attn_metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchConfig, attention_cls: type[LlamaAttention],
                 backend: AttentionBackend, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(arch.vocab_size, arch.hidden_size, dtype)
        rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                 arch.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, attention_cls(arch, i, rotary, backend, dtype, quant), dtype,
                              quant)
            for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """model(input_ids [T], positions [T], kv_caches, attn_metadata) -> hidden [T, hidden]."""

    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype = torch.float32,
                 attention_backend: str | AttentionBackend = "torch",
                 quant: QuantConfig | None = None) -> None:
        """`quant` applies to the decoder's linear layers; embeddings and lm_head stay dense."""
        super().__init__()
        backend = (get_attention_backend(attention_backend)
                   if isinstance(attention_backend, str) else attention_backend)
        self.arch = arch
        self.quant = quant
        self.model = LlamaModel(arch, self.attention_cls, backend, dtype, quant)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, dtype=dtype)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (only rows being sampled) -> float32 logits [N, vocab]."""
        return self.lm_head(hidden).float()
