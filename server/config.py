"""Frozen configuration. `resolve_*` functions turn "auto" into numbers; nothing mutates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    # Exactly one source of the block count is used: num_kv_blocks if given, else
    # kv_cache_memory bytes (CPU), else gpu_memory_utilization (CUDA).
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1], "
                             f"got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ModelConfig:
    model: str
    dtype: DType = "auto"
    tokenizer: str | None = None
    max_model_len: int | None = None
    seed: int = 0
    # "auto": Triton on CUDA; on CPU the native C++ kernel when it builds, else "torch".
    attention_backend: str = "auto"
    # None (the checkpoint's own: dense, or AWQ int4), "int8" or "int4" (quantize at load).
    quantization: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.model)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"


def resolve_max_model_len(requested: int | None, model_max: int | None) -> int:
    """The context length: the user's value, capped by what the model supports."""
    if requested is None:
        return model_max or 2048
    if model_max is not None and requested > model_max:
        raise ValueError(
            f"max_model_len={requested} exceeds the model's max_position_embeddings={model_max}"
        )
    return requested


def resolve_num_kv_blocks(cache: CacheConfig, bytes_per_block: int, device_type: str,
                          free_device_bytes: int | None = None) -> int:
    """Number of KV blocks from the explicit count, a byte budget, or GPU free memory."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if device_type == "cuda" and cache.kv_cache_memory is None:
        if free_device_bytes is None:
            raise ValueError("free_device_bytes is required to size the KV cache on CUDA")
        budget = int(free_device_bytes * cache.gpu_memory_utilization)
    else:
        budget = cache.kv_cache_memory if cache.kv_cache_memory is not None else 4 << 30
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds no block of {bytes_per_block} bytes"
        )
    return blocks
