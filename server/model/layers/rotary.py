"""Rotary position embedding with a precomputed cos/sin table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import kernels


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float,
                 rope_scaling: Mapping[str, Any] | None = None, is_neox: bool = True) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.is_neox = is_neox
        # float32 so bf16 models still rotate with exact angles; not saved in checkpoints.
        cache = kernels.build_cos_sin_cache(head_dim, max_position, base, rope_scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.rotary_embedding(
            positions, query, key, self.cos_sin_cache, self.head_dim, self.is_neox
        )
