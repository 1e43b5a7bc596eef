"""In-process engine: tokenizer + engine core + output processing.

The offline `LLM` and the tests use this directly; the HTTP server runs the same
EngineCore in its own process.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

from server.config import EngineConfig
from server.output_processor import OutputProcessor
from server.outputs import RequestOutput
from server.request import Request, resolve_max_tokens, validate_prompt, validate_scheduling
from server.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        from server.engine_factory import build_engine_core, resolve_eos_token_ids

        self.tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer_path)
        self.eos_token_ids = resolve_eos_token_ids(config.model.path, self.tokenizer)
        self.core, self.info, self.config = build_engine_core(config, self.eos_token_ids)
        self.attention_backend = self.info.attention_backend
        self.num_kv_blocks = self.info.num_kv_blocks
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
                    params: SamplingParams, *, priority: int = 0, tenant: str | None = None,
                    tenant_weight: float = 1.0) -> str:
        """Validate and enqueue; n > 1 fans out into n sequences sharing the prompt blocks."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        text, ids = self.tokenize_prompt(prompt)
        self.validate(ids, params, priority, tenant_weight)
        max_tokens = resolve_max_tokens(len(ids), params, self.max_model_len)
        child_ids = self.output_processor.add_request(request_id, text, ids, params)
        for child_id in child_ids:
            self.core.add_request(Request(
                child_id, ids, params, self.eos_token_ids, max_tokens=max_tokens,
                share_key=request_id if params.n > 1 else None, priority=priority,
                tenant=tenant, tenant_weight=tenant_weight))
        return request_id

    def validate(self, ids: list[int], params: SamplingParams, priority: int = 0,
                 tenant_weight: float = 1.0) -> None:
        validate_prompt(ids, params, self.info.vocab_size, self.max_model_len)
        validate_scheduling(priority, tenant_weight)

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
