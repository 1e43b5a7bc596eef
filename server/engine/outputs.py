"""The contract between scheduler and runner, and what the engine emits per step.

New requests are sent to the runner once in full; afterwards only diffs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.outputs import RequestTimes
from server.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen, or one resumed after preemption (sent in full)."""

    req_id: str
    prompt_token_ids: list[int]
    # Output tokens so far: non-empty only when resuming after preemption.
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """A request already in the runner's batch: only what changed this step."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData] = field(default_factory=list)
    scheduled_cached_reqs: list[CachedRequestData] = field(default_factory=list)
    # req_id -> tokens to compute this step (prefill chunk or 1 for decode).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Requests that finished or were preempted since the last step: the runner drops them.
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class Logprobs:
    """Per position: the sampled (or prompt) token's logprob and rank, plus the top-k."""

    token_ids: list[list[int]]  # [pos][0] is the chosen token, then the top-k
    logprobs: list[list[float]]
    ranks: list[int]  # rank of the chosen token (1 = most likely)


@dataclass
class RunnerOutput:
    """What one model step produced, per scheduled request."""

    # req_id -> sampled token ids (empty while a prompt is still being prefilled).
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
    # Prompt logprobs for the chunk computed this step (position i scores token i+1).
    prompt_logprobs: dict[str, Logprobs] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """One request's progress after a step: new tokens and, when done, why."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: Logprobs | None = None
    prompt_logprobs: Logprobs | None = None
    num_cached_tokens: int = 0
    # Set by the engine core on the output with the first token and on the final one.
    times: RequestTimes | None = None
