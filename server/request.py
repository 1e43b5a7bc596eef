"""One request's state inside the engine. Pure Python: the scheduler owns it."""

from __future__ import annotations

import enum
import math
import time

from server.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    # Everything after this point is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: RequestStatus) -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: RequestStatus) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(status)


class Request:
    """Token ids and progress of one sequence.

    The scheduler's one rule: `num_computed_tokens` catches up with `num_tokens`.
    `max_tokens` is already resolved against max_model_len by the engine.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        arrival_time: float | None = None,
        max_tokens: int | None = None,
        share_key: str | None = None,
        *,
        priority: int = 0,
        tenant: str | None = None,
        tenant_weight: float = 1.0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.max_tokens = max_tokens if max_tokens is not None else sampling_params.max_tokens
        # Siblings of one n > 1 request share this key and hence their prompt blocks, even
        # with prefix caching off.
        self.share_key = share_key
        # Scheduling: lower priority first (as in vLLM); tenants share the engine by weight
        # (None is the default tenant).
        self.priority = priority
        self.tenant = tenant
        self.tenant_weight = tenant_weight
        # The class the scheduler admitted it at: priority, improved by aging while it
        # waited. Only a request of a better class may preempt it.
        self.effective_priority = priority
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache when first scheduled.
        self.num_cached_tokens = -1
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # Chained hashes of this request's full blocks, filled by the KV cache manager.
        self.block_hashes: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    @property
    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    @property
    def finish_reason(self) -> str | None:
        return RequestStatus.finish_reason(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, {self.status.name})")


def validate_prompt(ids: list[int], params: SamplingParams, vocab_size: int,
                    max_model_len: int) -> None:
    """Checks every engine front (offline or HTTP) makes before a request is queued."""
    if not ids:
        raise ValueError("the prompt is empty")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")
    if len(ids) >= max_model_len:
        raise ValueError(
            f"the prompt has {len(ids)} tokens; with max_model_len={max_model_len} "
            f"it leaves no room for output"
        )
    params.validate_for_vocab(vocab_size)


def validate_scheduling(priority: int, tenant_weight: float) -> None:
    """The scheduling hints every engine front checks before a request is queued."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if not (isinstance(tenant_weight, (int, float)) and math.isfinite(tenant_weight)
            and tenant_weight > 0):
        raise ValueError(f"tenant_weight must be a positive number, got {tenant_weight!r}")


def resolve_max_tokens(num_prompt_tokens: int, params: SamplingParams,
                       max_model_len: int) -> int:
    """params.max_tokens capped by the room left in the context (all of it when unset)."""
    room = max_model_len - num_prompt_tokens
    return room if params.max_tokens is None else min(room, params.max_tokens)
