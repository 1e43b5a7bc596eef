"""What the HTTP layer needs from an engine, whatever process it runs in."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.outputs import RequestOutput
from server.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine process died: in-flight and new requests fail, health turns 503."""


@dataclass(frozen=True)
class ModelInfo:
    max_model_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]


class EngineClient(ABC):
    """Streams each request's outputs; one asyncio queue per request behind the scenes.

    `generate` yields RequestOutputs whose `outputs` hold only the sequences that changed
    since the previous yield, each a CompletionOutput with the NEW text / token_ids /
    logprobs only (deltas) and finish_reason set on the sequence's last delta. The first
    yield carries prompt_logprobs when they were asked for. The last yield has
    finished=True. If the caller stops iterating (client disconnect, cancellation) the
    request is aborted in the engine and its KV blocks are freed.
    """

    tokenizer: Any
    info: ModelInfo

    @abstractmethod
    def is_ready(self) -> bool:
        """The model is loaded and the engine accepts requests."""

    @abstractmethod
    def is_dead(self) -> bool:
        """The engine has died; nothing will ever complete again."""

    @abstractmethod
    def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, *, priority: int = 0, tenant: str | None = None,
                 tenant_weight: float = 1.0) -> AsyncIterator[RequestOutput]:
        """Raises ValueError (duplicate id, invalid params) or EngineDeadError.

        The engine admits lower `priority` first (aging lifts long waiters) and shares its
        slots and prompt tokens between tenants by `tenant_weight` (None: the default
        tenant).
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request; unknown or finished ids are ignored."""

    @abstractmethod
    async def get_stats(self) -> dict[str, float]:
        """num_running, num_waiting, kv_cache_usage, num_free_blocks, num_kv_blocks,
        prefix_cache_queries, prefix_cache_hits, num_preemptions."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine (abort what runs) and release its process or thread."""
