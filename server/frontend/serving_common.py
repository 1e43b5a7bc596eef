"""What completions and chat share: request checks, SamplingParams, SSE and disconnects,
and the Serving base class (admission, then the engine jobs of engine_streams.py).

Nothing here touches HTTP types beyond `Request.is_disconnected`; the serving classes turn
engine outputs into wire objects and the routes turn those into responses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel
from starlette.requests import Request

from server.frontend.engine_client import EngineClient
from server.frontend.engine_streams import EngineJob
from server.frontend.errors import (
    APIError,
    engine_dead_error,
    engine_not_ready_error,
    sse_error_event,
)
from server.frontend.metrics import Metrics
from server.frontend.protocol import SamplingRequest
from server.frontend.request_limits import (
    DEFAULT_MAX_N,
    RequestLimits,
    context_exceeded,
    prompt_param,
)
from server.frontend.tokenization import TokenizerService
from server.outputs import CompletionOutput, Logprob, PositionLogprobs
from server.sampling_params import SamplingParams

if TYPE_CHECKING:
    from server.frontend.admission import Admission, Ticket

T = TypeVar("T")

MAX_N = DEFAULT_MAX_N
# Request priorities (lower first) are bounded so aging (one class per N engine steps) lifts
# even the lowest within a bounded wait.
MAX_PRIORITY = 1_000_000
MAX_LOGPROBS = 20
# JSON has no -inf; OpenAI-compatible servers report impossible tokens as this floor.
LOGPROB_FLOOR = -9999.0
SSE_DONE = "data: [DONE]\n\n"

# Request fields copied as-is into SamplingParams when present.
_PASSTHROUGH = (
    "temperature", "top_p", "top_k", "min_p", "seed", "min_tokens", "stop", "stop_token_ids",
    "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "skip_special_tokens", "include_stop_str_in_output",
)
_PARAM_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class ServingContext:
    """Everything a request handler needs; one per app, kept on app.state."""

    engine: EngineClient
    tokenizer: TokenizerService
    served_model_name: str
    # None: no metrics recorded (tests that build a context by hand).
    metrics: Metrics | None = None
    # How often a non-streaming handler checks whether its client is still there.
    disconnect_poll_s: float = 0.5
    limits: RequestLimits = field(default_factory=RequestLimits)
    # None: no queue accounting, rate limits or timeout (tests that build a context by hand).
    admission: Admission | None = None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model",
                           code="model_not_found")

    def check_engine(self) -> None:
        if self.engine.is_dead():
            raise engine_dead_error()
        if not self.engine.is_ready():
            raise engine_not_ready_error()


@dataclass
class ChoiceState:
    """One choice accumulated over its deltas, for non-streaming responses."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    positions: list[PositionLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, out: CompletionOutput) -> None:
        self.text.append(out.text)
        self.token_ids.extend(out.token_ids)
        self.positions.extend(out.logprobs or [None] * len(out.token_ids))
        if out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason


def now() -> int:
    return int(time.time())


def sse(chunk: BaseModel, exclude: set[str] | None = None) -> str:
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def clamp_logprob(value: float) -> float:
    if math.isnan(value):
        return LOGPROB_FLOOR
    return max(value, LOGPROB_FLOOR)


def check_common(req: SamplingRequest, max_n: int = MAX_N) -> int:
    """Checks that SamplingParams cannot make; returns n."""
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(f"response_format type {req.response_format.type!r} is not supported; "
                       "only 'text' is.", param="response_format")
    n = 1 if req.n is None else req.n
    if n > max_n:
        raise APIError(f"n must be at most {max_n}, got {n}.", param="n")
    if req.priority is not None and not -MAX_PRIORITY <= req.priority <= MAX_PRIORITY:
        raise APIError(f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}, got "
                       f"{req.priority}.", param="priority")
    return n


def _params_error(exc: ValueError, rename: dict[str, str]) -> APIError:
    message = str(exc)
    field = message.split(" ", 1)[0]
    if field not in _PARAM_NAMES:
        return APIError(message)
    param = rename.get(field, field)
    return APIError(param + message[len(field):], param=param)


def build_params(req: SamplingRequest, vocab_size: int, *, n: int, max_tokens: int | None,
                 logprobs: int | None, prompt_logprobs: int | None,
                 rename: dict[str, str]) -> SamplingParams:
    """SamplingParams from the request; `rename` maps param fields to request field names."""
    kwargs: dict[str, Any] = {f: getattr(req, f) for f in _PASSTHROUGH
                              if getattr(req, f) is not None}
    if req.logit_bias is not None:
        try:
            kwargs["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError("logit_bias keys must be token ids written as strings.",
                           param="logit_bias") from None
    kwargs.update(n=n, max_tokens=max_tokens, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
    try:
        params = SamplingParams(**kwargs)
        params.validate_for_vocab(vocab_size)
    except ValueError as exc:
        raise _params_error(exc, rename) from None
    return params


def fit_to_context(params: SamplingParams, prompt_len: int, max_model_len: int, *,
                   prompt_param: str, max_tokens_param: str,
                   rename: dict[str, str]) -> SamplingParams:
    """Checks prompt + max_tokens against the context; an absent max_tokens fills it."""
    if prompt_len >= max_model_len:
        raise context_exceeded(prompt_param, prompt_len, max_model_len)
    if params.max_tokens is not None:
        if prompt_len + params.max_tokens > max_model_len:
            raise APIError(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the "
                f"prompt, {params.max_tokens} for the completion). Reduce the prompt or "
                f"{max_tokens_param}.", param=max_tokens_param, code="context_length_exceeded")
        return params
    try:
        # Like vLLM: without a limit the completion may use the rest of the context.
        return dataclasses.replace(params, max_tokens=max_model_len - prompt_len)
    except ValueError as exc:
        raise _params_error(exc, rename) from None


def check_token_ids(ids: list[int], vocab_size: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"Token ids must be in [0, {vocab_size}); got {bad[:5]}.", param=param)


def token_text(tokenizer: TokenizerService, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode_token(token_id)


async def sse_with_errors(chunks: AsyncGenerator[str]) -> AsyncIterator[str]:
    """Ends every stream with [DONE]; an error after the first byte becomes an SSE event."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        yield sse_error_event(exc)
    finally:
        # Closes the inner generator now rather than at garbage collection; it never
        # suspends, as the inner cleanup does not await.
        await chunks.aclose()
    yield SSE_DONE


async def _wait_disconnected(request: Request, poll_s: float) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[T]],
                              poll_s: float) -> T:
    """Runs `work`, cancelling it (and so aborting its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_disconnected(request, poll_s))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise APIError("The client disconnected before the response was ready.", status=499,
                       code="client_disconnected")
    finally:
        task.cancel()
        watcher.cancel()


class Serving:
    """One endpoint's flow: prepare the engine jobs, then stream them or collect a response.

    Subclasses provide `_prepare(req)`, `_stream(prep, include_usage)` and `_collect(prep)`.
    """

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: Any, raw: Request) -> Any:
        arrival = time.monotonic()
        admission = self.ctx.admission
        if admission is None:
            return await self._create(req, raw, arrival, None)
        # Admission (limits, queue, tenant tokens, deadline); see admission.py.
        ticket = admission.admit(req, raw.state, self.ctx.engine.info.max_model_len)
        try:
            result = await ticket.within_deadline(self._create(req, raw, arrival, ticket))
        except BaseException:
            ticket.close()
            raise
        if not req.stream:
            ticket.close()
        return result

    async def _create(self, req: Any, raw: Request, arrival: float,
                      ticket: Ticket | None) -> Any:
        prep = await self._prepare(req)
        jobs = self._jobs(prep)
        # The tenant, when API keys name one (tenants.py), for the scheduler's fair share.
        tenant = getattr(raw.state, "tenant", None)
        for job in jobs:
            job.arrival = arrival
            job.priority = req.priority or 0
            if tenant is not None:
                job.tenant, job.tenant_weight = tenant.name, tenant.weight
        if ticket is not None:
            ticket.start(jobs, prompt_param(req))
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = self._stream(prep, include_usage)
            return sse_with_errors(chunks if ticket is None else ticket.guard_stream(chunks))
        return await unless_disconnected(raw, lambda: self._collect(prep),
                                         self.ctx.disconnect_poll_s)

    async def _prepare(self, req: Any) -> Any:
        raise NotImplementedError

    def _jobs(self, prep: Any) -> list[EngineJob]:
        raise NotImplementedError

    def _stream(self, prep: Any, include_usage: bool) -> AsyncGenerator[str]:
        raise NotImplementedError

    async def _collect(self, prep: Any) -> Any:
        raise NotImplementedError
