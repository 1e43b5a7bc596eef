"""The attention layer: a model's view (heads, scale, window) over a backend."""

from __future__ import annotations

import torch
from torch import nn

from server.model.attn_metadata import AttentionMetadata
from server.model.layers.attention_backend import AttentionBackend


class Attention(nn.Module):
    """Paged causal attention for one layer; holds no weights."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 backend: AttentionBackend, sliding_window: int | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.backend = backend

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> torch.Tensor:
        """query [T, Hq * D], key/value [T, Hkv * D] -> [T, Hq * D]."""
        t = query.shape[0]
        out = self.backend.forward(
            query.view(t, self.num_heads, self.head_dim),
            key.view(t, self.num_kv_heads, self.head_dim),
            value.view(t, self.num_kv_heads, self.head_dim),
            kv_cache, attn_metadata, self.scale, self.sliding_window,
        )
        return out.view(t, self.num_heads * self.head_dim)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, sliding_window={self.sliding_window}, "
                f"backend={self.backend.name}")
