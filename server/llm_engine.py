"""In-process engine: tokenizer + engine core + output processing.

The offline `LLM` and the tests use this directly; the HTTP server runs the same
EngineCore in its own process.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from server.config import (
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    resolve_max_model_len,
    resolve_num_kv_blocks,
)
from server.engine.core import EngineCore
from server.engine.scheduler import Scheduler
from server.output_processor import OutputProcessor
from server.outputs import RequestOutput
from server.request import Request
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return None


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        from server.model.hf_config import read_eos_token_ids
        from server.model.kv_cache import allocate_kv_cache, kv_cache_bytes_per_block
        from server.model.layers.attention_backend import resolve_attention_backend
        from server.model.loader import load_model
        from server.runner.model_runner import ModelRunner

        mc = config.model
        device = torch.device(config.device)
        if mc.seed is not None:
            torch.manual_seed(mc.seed)
        backend = resolve_attention_backend(mc.attention_backend, device)
        logger.info("attention backend: %s", backend)
        model, arch, dtype = load_model(mc.path, dtype=mc.dtype, device=device,
                                        attention_backend=backend)
        self.attention_backend = backend
        self.arch = arch
        self.dtype = dtype
        max_model_len = resolve_max_model_len(mc.max_model_len, arch.max_position_embeddings)
        sched_cfg = SchedulerConfig(
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=max_model_len,
        )
        bs = config.cache.block_size
        per_block = kv_cache_bytes_per_block(arch, bs, dtype)
        num_blocks = resolve_num_kv_blocks(config.cache, per_block, device.type,
                                           _free_device_bytes(device))
        if num_blocks * bs < max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {bs} tokens = {num_blocks * bs} "
                f"tokens, fewer than max_model_len={max_model_len}: give it more memory "
                f"(kv_cache_memory / num_kv_blocks) or lower max_model_len"
            )
        kv_caches = allocate_kv_cache(arch, num_blocks, bs, dtype, device)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, bs,
                    num_blocks * per_block / 2**20)
        self.num_kv_blocks = num_blocks
        self.config = EngineConfig(model=mc, cache=config.cache, scheduler=sched_cfg,
                                   device=config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer_path)
        self.eos_token_ids = read_eos_token_ids(mc.path)
        if not self.eos_token_ids and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = frozenset([self.tokenizer.eos_token_id])
        self.runner = ModelRunner(model, kv_caches, bs, arch.vocab_size, self.eos_token_ids,
                                  device)
        self.core = EngineCore(Scheduler(sched_cfg, config.cache, num_blocks), self.runner)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer(prompt).input_ids
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"unsupported prompt type {type(prompt).__name__}")

    def add_request(self, request_id: str | None, prompt: PromptType,
                    params: SamplingParams) -> str:
        """Validate and enqueue; n > 1 fans out into n sequences sharing the prompt blocks."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, ids = self.tokenize_prompt(prompt)
        self.validate(ids, params)
        max_tokens = self.max_model_len - len(ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        child_ids = self.output_processor.add_request(request_id, text, ids, params)
        for child_id in child_ids:
            self.core.add_request(Request(
                child_id, ids, params, self.eos_token_ids, max_tokens=max_tokens,
                share_key=request_id if params.n > 1 else None))
        return request_id

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.arch.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with max_model_len={self.max_model_len} "
                f"it leaves no room for output"
            )
        params.validate_for_vocab(vocab)

    def abort_request(self, request_ids: list[str]) -> None:
        self.core.abort_requests(self.output_processor.abort(request_ids))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        result = self.output_processor.process(core_outputs)
        if result.stop_string_req_ids:
            self.core.stop_requests(result.stop_string_req_ids)
        return result.request_outputs
