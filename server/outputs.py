"""User-facing results, shaped like vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass

# One position's logprobs: token id -> Logprob, the chosen token first.
PositionLogprobs = dict[int, "Logprob"]


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    # The stop string or stop token id that ended the sequence (None for EOS / length).
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestMetrics:
    """A finished request's engine timestamps (time.monotonic()), over all n sequences:
    the earliest scheduling and first token, the latest finish. A sequence ended by a stop
    string (found by the front end) finishes when the front end saw it."""

    arrival_time: float
    first_scheduled_time: float
    first_token_time: float | None
    finished_time: float

    @property
    def queue_time(self) -> float:
        """Arrival to first scheduling (a preempted request is not queued again)."""
        return self.first_scheduled_time - self.arrival_time

    @property
    def prefill_time(self) -> float | None:
        return None if self.first_token_time is None else \
            self.first_token_time - self.first_scheduled_time

    @property
    def decode_time(self) -> float | None:
        return None if self.first_token_time is None else \
            self.finished_time - self.first_token_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    # First entry None (the first prompt token has no context), then one per token.
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # On the finished output, when the engine reported its timestamps.
    metrics: RequestMetrics | None = None
