"""Sizing and allocation of the paged KV cache (one tensor per layer)."""

from __future__ import annotations

import torch

from server.model.hf_config import ModelArchConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown KV cache dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def kv_cache_bytes_per_block(arch: ModelArchConfig, block_size: int,
                             dtype: torch.dtype | str) -> int:
    """Bytes one block takes across all layers, K and V."""
    itemsize = torch.empty((), dtype=_dtype(dtype)).element_size()
    return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * itemsize


def allocate_kv_cache(arch: ModelArchConfig, num_blocks: int, block_size: int,
                      dtype: torch.dtype | str, device: torch.device | str) -> list[torch.Tensor]:
    """Per layer a zeroed [2, num_blocks, block_size, num_kv_heads, head_dim] tensor (K, V).

    Zeroed rather than empty so that padded, masked-out slots never hold NaN/Inf, which
    would poison a masked softmax through 0 * NaN.
    """
    shape = (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [torch.zeros(shape, dtype=_dtype(dtype), device=device)
            for _ in range(arch.num_layers)]
