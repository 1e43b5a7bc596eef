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
    # Most prompt tokens one request computes in a step while others run or wait (0 = no cap).
    long_prefill_token_threshold: int = 0
    # A waiting request moves up one priority class per this many engine steps (0 = never).
    priority_aging_steps: int = 100

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("long_prefill_token_threshold", "priority_aging_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


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


CPU_DEFAULT_KV_BYTES = 4 << 30


def resolve_num_kv_blocks(cache: CacheConfig, bytes_per_block: int, device_type: str,
                          free_device_bytes: int | None = None) -> int:
    """Number of KV blocks from the explicit count, a byte budget, or free memory: on CUDA
    gpu_memory_utilization of the GPU's, on CPU 4 GiB or half the host's, if less."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if device_type == "cuda" and cache.kv_cache_memory is None:
        if free_device_bytes is None:
            raise ValueError("free_device_bytes is required to size the KV cache on CUDA")
        budget = int(free_device_bytes * cache.gpu_memory_utilization)
    elif cache.kv_cache_memory is not None:
        budget = cache.kv_cache_memory
    else:
        # The default must start on a small machine too; an explicit size is checked as is.
        budget = CPU_DEFAULT_KV_BYTES
        if free_device_bytes is not None:
            budget = min(budget, free_device_bytes // 2)
    blocks = budget // bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"KV cache budget of {budget} bytes holds no block of {bytes_per_block} bytes"
            f"{_available_note(free_device_bytes, device_type)}"
        )
    return blocks


def _available_note(available_bytes: int | None, device_type: str) -> str:
    if available_bytes is None:
        return ""
    return f" ({available_bytes} bytes ({available_bytes / 2**30:.2f} GiB) available on " \
           f"{device_type})"


def check_kv_cache_fits(num_blocks: int, bytes_per_block: int, block_size: int,
                        max_model_len: int, device_type: str,
                        available_bytes: int | None) -> None:
    """Refuses, before anything is allocated, a KV cache larger than the memory left where
    it lives or too small for one sequence at max_model_len; the message says how many
    bytes were asked for and how many are available."""
    asked = num_blocks * bytes_per_block
    available = _available_note(available_bytes, device_type)
    if available_bytes is not None and asked > available_bytes:
        raise ValueError(
            f"the KV cache asks for {asked} bytes ({asked / 2**30:.2f} GiB: {num_blocks} "
            f"blocks x {bytes_per_block} bytes) but only {available_bytes} bytes "
            f"({available_bytes / 2**30:.2f} GiB) are available on {device_type}: lower "
            "num_kv_blocks / kv_cache_memory / gpu_memory_utilization")
    if num_blocks * block_size < max_model_len:
        need = -(-max_model_len // block_size)
        raise ValueError(
            f"the KV cache holds {num_blocks} blocks x {block_size} tokens = "
            f"{num_blocks * block_size} tokens ({asked} bytes), fewer than "
            f"max_model_len={max_model_len}, which needs {need} blocks = "
            f"{need * bytes_per_block} bytes{available}: give it more memory "
            "(kv_cache_memory / num_kv_blocks) or lower max_model_len")
