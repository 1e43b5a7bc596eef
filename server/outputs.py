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
class RequestTimes:
    """A request's engine timestamps (time.monotonic(): one clock for every process on the
    host, so the front end's arrival time and these compare directly).

    The engine sends them per sequence; a finished RequestOutput carries them over all n
    sequences: the earliest scheduling and first token, the latest finish. `first_scheduled`
    is the FIRST admission: a sequence preempted and admitted again counts its queue time
    only up to its first scheduling. A sequence ended by a stop string (found by the front
    end) finishes when the front end saw it.
    """

    arrival: float
    first_scheduled: float
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_time(self) -> float:
        return self.first_scheduled - self.arrival

    @property
    def prefill_time(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.first_scheduled

    @property
    def decode_time(self) -> float | None:
        if self.first_token is None or self.finished is None:
            return None
        return self.finished - self.first_token


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
    metrics: RequestTimes | None = None
