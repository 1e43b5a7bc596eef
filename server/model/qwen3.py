"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys before rope."""

from __future__ import annotations

import torch

from server.model.hf_config import ModelArchConfig
from server.model.layers.attention_backend import AttentionBackend
from server.model.layers.norm import RMSNorm
from server.model.layers.rotary import RotaryEmbedding
from server.model.llama import LlamaAttention, LlamaForCausalLM
from server.model.quantization import QuantConfig


class Qwen3Attention(LlamaAttention):
    def __init__(self, arch: ModelArchConfig, layer: int, rotary_emb: RotaryEmbedding,
                 backend: AttentionBackend, dtype: torch.dtype,
                 quant: QuantConfig | None = None) -> None:
        super().__init__(arch, layer, rotary_emb, backend, dtype, quant)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, d = q.shape[0], self.head_dim
        q = self.q_norm(q.reshape(t, -1, d)).view(t, -1)
        k = self.k_norm(k.reshape(t, -1, d)).view(t, -1)
        return q, k


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
