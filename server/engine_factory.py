"""Builds an EngineCore from an EngineConfig: model, KV cache, runner, scheduler.

Runs wherever the engine runs (the offline LLM's process, or the engine process behind
the HTTP server); this is the one place that turns "auto" settings into numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import (
    EngineConfig,
    check_kv_cache_fits,
    resolve_max_model_len,
    resolve_num_kv_blocks,
)
from server.engine.core import EngineCore
from server.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What the engine resolved at start-up, for the front end and the logs."""

    max_model_len: int
    vocab_size: int
    num_kv_blocks: int
    block_size: int
    attention_backend: str
    dtype: str
    weight_bytes: int
    quantization: str = "none"


def resolve_eos_token_ids(model_path: Path, tokenizer: Any) -> frozenset[int]:
    """generation_config.json / config.json eos ids, else the tokenizer's eos token."""
    from server.model.hf_config import read_eos_token_ids

    eos = read_eos_token_ids(model_path)
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = frozenset([tokenizer.eos_token_id])
    return eos


def available_memory(device: Any) -> int | None:
    """Bytes free for the KV cache: the GPU's free memory, or the host's MemAvailable
    (None where /proc/meminfo cannot be read)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _resident_weight_bytes(model: Any) -> int:
    """Parameters and buffers, plus linear weights that were re-packed outside them."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for module in model.modules():
        packed = getattr(module, "packed_weight", None)
        if packed is not None:
            tensors[id(packed)] = packed
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_engine_core(config: EngineConfig, eos_token_ids: frozenset[int]
                      ) -> tuple[EngineCore, EngineInfo, EngineConfig]:
    """Load the model and size the KV cache; returns the core, what was resolved, and the
    config with max_model_len filled in."""
    import torch

    from server.model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
    from server.model.layers.attention_backend import resolve_attention_backend
    from server.model.layers.linear import warm_onednn_shapes
    from server.model.loader import load_model
    from server.model.quantization import describe as describe_quant
    from server.runner.model_runner import ModelRunner

    mc = config.model
    device = torch.device(config.device)
    if mc.seed is not None:
        torch.manual_seed(mc.seed)
    backend = resolve_attention_backend(mc.attention_backend, device)
    model, arch, dtype = load_model(mc.path, dtype=mc.dtype, device=device,
                                    attention_backend=backend, quantization=mc.quantization)
    quantization = describe_quant(model.quant)
    weight_bytes = _resident_weight_bytes(model)
    max_model_len = resolve_max_model_len(mc.max_model_len, arch.max_position_embeddings)
    sched_cfg = dataclasses.replace(config.scheduler, max_model_len=max_model_len)
    bs = config.cache.block_size
    per_block = kv_cache_bytes_per_block(arch, bs, dtype)
    free = available_memory(device)
    num_blocks = resolve_num_kv_blocks(config.cache, per_block, device.type, free)
    check_kv_cache_fits(num_blocks, per_block, bs, max_model_len, device.type, free)
    kv_caches = allocate_kv_cache(arch, num_blocks, bs, dtype, device)
    logger.info("model %s: %s weights, quantization %s, resident weight memory %.1f MiB, "
                "attention backend %s; KV cache %d blocks of %d tokens (%.1f MiB)", mc.model,
                str(dtype).removeprefix("torch."), quantization, weight_bytes / 2**20, backend,
                num_blocks, bs, num_blocks * per_block / 2**20)
    if device.type == "cpu":
        # Decode batches take every size up to max_num_seqs; prefill-sized ones are rarer and
        # cost real compute to warm (seconds for a large model), so they stay lazy.
        t0 = time.perf_counter()
        n = warm_onednn_shapes(model, min(sched_cfg.max_num_seqs,
                                          sched_cfg.max_num_batched_tokens))
        if n:
            logger.info("warmed %d oneDNN matmul shapes in %.1f s", n, time.perf_counter() - t0)
    runner = ModelRunner(model, kv_caches, bs, arch.vocab_size, eos_token_ids, device)
    core = EngineCore(Scheduler(sched_cfg, config.cache, num_blocks), runner)
    info = EngineInfo(max_model_len=max_model_len, vocab_size=arch.vocab_size,
                      num_kv_blocks=num_blocks, block_size=bs, attention_backend=backend,
                      dtype=str(dtype).removeprefix("torch."), weight_bytes=weight_bytes,
                      quantization=quantization)
    resolved = EngineConfig(model=mc, cache=config.cache, scheduler=sched_cfg,
                            device=config.device)
    # Everything loaded so far (torch, transformers, the tokenizer: ~300k objects) lives for
    # the whole run; without this every full collection rescans it and stalls a step ~0.2 s.
    gc.collect()
    gc.freeze()
    return core, info, resolved
