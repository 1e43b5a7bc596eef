"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

import kernels


class SiluAndMul(nn.Module):
    """[..., 2 * I] (gate then up, as packed by gate_up_proj) -> silu(gate) * up."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)
