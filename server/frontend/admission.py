"""Admission control in the front end: the queue of accepted requests, refusals, timeouts.

A request is "queued" from the moment it is accepted until its first output comes back
from the engine (it waits in the engine's queue or is being prefilled); each prompt counts
as one request, with its prompt tokens. The request count is checked before tokenizing,
the token count right after it, before anything reaches the engine. Beyond either limit
the request is refused at once with a 429 `rate_limit_error` and a `Retry-After` estimated
from how fast the queue drained lately. One request alone is always admitted into an empty
queue, so a limit below one request's size slows it down instead of refusing it forever.

Each HTTP request holds a `Ticket`: its queue places (given back per prompt at its first
output), its tenant's token reservation (refunded, less what it used, when it ends), and
its deadline under --request-timeout. `Ticket.close()` is idempotent; the serving code
calls it when the response is done and `AdmissionMiddleware` again after the response, for
a stream that was cancelled before it ever started.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.frontend.errors import APIError
from server.frontend.request_limits import (
    RequestLimits,
    body_too_large,
    check_prompt_bound,
    check_prompt_tokens,
    check_sampling_limits,
    num_prompts,
    request_timeout_error,
)
from server.outputs import RequestOutput

if TYPE_CHECKING:
    from server.frontend.engine_streams import EngineJob
    from server.frontend.metrics import Metrics

T = TypeVar("T")

RATE_LIMIT_ERROR = "rate_limit_error"
RATE_LIMIT_CODE = "rate_limit_exceeded"
# Refusal reasons, the `reason` label of requests_rejected_total.
REJECT_QUEUED_REQUESTS = "queued_requests"
REJECT_QUEUED_TOKENS = "queued_tokens"
REJECT_TENANT_REQUESTS = "tenant_requests"
REJECT_TENANT_TOKENS = "tenant_tokens"
REJECT_BODY_SIZE = "body_too_large"
REJECT_REASONS = (REJECT_QUEUED_REQUESTS, REJECT_QUEUED_TOKENS, REJECT_TENANT_REQUESTS,
                  REJECT_TENANT_TOKENS, REJECT_BODY_SIZE)
# Retry-After bounds (seconds) and how many recent queue exits estimate the drain rate.
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 60
_DRAIN_SAMPLES = 64
TICKET_STATE = "admission_ticket"


def rate_limited(message: str, retry_after_s: float,
                 headers: dict[str, str] | None = None) -> APIError:
    """A 429 OpenAI clients read as RateLimitError, with Retry-After in whole seconds
    (rounded up, after dropping float noise below a microsecond)."""
    seconds = min(MAX_RETRY_AFTER_S,
                  max(MIN_RETRY_AFTER_S, math.ceil(round(retry_after_s, 6))))
    return APIError(message, status=429, type=RATE_LIMIT_ERROR, code=RATE_LIMIT_CODE,
                    headers={**(headers or {}), "Retry-After": str(seconds)})


class AdmissionMetrics:
    """Queue depth gauges and refusal / timeout counters, in the app's Metrics registry
    under each of its prefixes (conveyor:, and vllm: with --vllm-metric-names)."""

    def __init__(self, metrics: Metrics) -> None:
        model, reg, lbl = metrics.model_name, metrics.registry, ["model_name"]
        self._queued_requests: list[Gauge] = []
        self._queued_tokens: list[Gauge] = []
        self._rejected: list[Counter] = []
        self._timeouts: list[Counter] = []
        for p in metrics.prefixes:
            self._queued_requests.append(Gauge(
                p + "frontend_queued_requests", "Requests accepted by the front end that "
                "have no output from the engine yet (one per prompt).", lbl,
                registry=reg).labels(model))
            self._queued_tokens.append(Gauge(
                p + "frontend_queued_prompt_tokens",
                "Prompt tokens of the front end's queued requests.", lbl,
                registry=reg).labels(model))
            rejected = Counter(p + "requests_rejected_total",
                               "Requests refused by admission control, by reason.",
                               ["model_name", "reason"], registry=reg)
            for reason in REJECT_REASONS:  # every reason reads 0 before it first happens
                rejected.labels(model, reason)
            self._rejected.append(rejected)
            self._timeouts.append(Counter(
                p + "request_timeouts_total", "Requests ended by --request-timeout.", lbl,
                registry=reg).labels(model))
        self._model = model

    def queue(self, requests: int, tokens: int) -> None:
        for g in self._queued_requests:
            g.set(requests)
        for g in self._queued_tokens:
            g.set(tokens)

    def rejected(self, reason: str) -> None:
        for c in self._rejected:
            c.labels(self._model, reason).inc()

    def timed_out(self) -> None:
        for c in self._timeouts:
            c.inc()


class Admission:
    """One per app: the limits, the front-end queue's counts, refusals."""

    def __init__(self, limits: RequestLimits, *, max_token_bytes: int | None = None,
                 metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.max_token_bytes = max_token_bytes
        self.metrics = AdmissionMetrics(metrics) if metrics is not None else None
        self.clock = clock
        self.queued_requests = 0
        self.queued_tokens = 0
        self._exits: deque[float] = deque(maxlen=_DRAIN_SAMPLES)

    # ---- accounting ---------------------------------------------------------------------

    def _changed(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(self.queued_requests, self.queued_tokens)

    def _leave(self, tokens: int, drained: bool) -> None:
        self.queued_requests -= 1
        self.queued_tokens -= tokens
        if drained:  # refusals and errors leave at once: they say nothing of the drain rate
            self._exits.append(self.clock())
        self._changed()

    def reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(reason)

    def retry_after(self) -> float:
        """Seconds until the queue has likely drained: its length over the rate at which
        recent requests got their first output; the minimum without two to measure."""
        if len(self._exits) < 2:
            return MIN_RETRY_AFTER_S
        span = self.clock() - self._exits[0]
        if span <= 0:
            return MIN_RETRY_AFTER_S
        rate = (len(self._exits) - 1) / span
        return self.queued_requests / rate

    # ---- the request's path -------------------------------------------------------------

    def admit(self, req: Any, state: Any, max_model_len: int) -> Ticket:
        """Before tokenizing: the cheap checks (400) and the queue count (429). `state` is
        the Starlette request's state, where the ticket is left for the middleware."""
        limits = self.limits
        check_sampling_limits(req, limits)
        check_prompt_bound(req, limits, self.max_token_bytes, max_model_len)
        num = num_prompts(req)
        cap = limits.max_num_queued_requests
        if cap is not None and self.queued_requests and self.queued_requests + num > cap:
            self.reject(REJECT_QUEUED_REQUESTS)
            raise rate_limited(
                f"The server's queue is full ({self.queued_requests} requests waiting, at "
                f"most {cap}); retry later.", self.retry_after())
        self.queued_requests += num
        self._changed()
        deadline = None
        if limits.request_timeout is not None:
            deadline = asyncio.get_running_loop().time() + limits.request_timeout
        ticket = Ticket(self, num, deadline, getattr(state, "rate_limits", None))
        setattr(state, TICKET_STATE, ticket)
        return ticket


class _JobWatch:
    """Sees one engine job's outputs: its first output frees its queue place."""

    def __init__(self, ticket: Ticket, index: int) -> None:
        self.ticket = ticket
        self.index = index

    def on_output(self, out: RequestOutput) -> None:
        self.ticket.leave_queue(self.index, drained=True)
        self.ticket.generated += sum(len(c.token_ids) for c in out.outputs)

    def close(self, aborted: bool) -> None:
        self.ticket.leave_queue(self.index)


class Ticket:
    """One HTTP request's claims on the queue and on its tenant's token budget."""

    def __init__(self, admission: Admission, num: int, deadline: float | None,
                 rate_limits: Any) -> None:
        self.admission = admission
        self.deadline = deadline
        self.rate_limits = rate_limits  # the tenant's TenantLimits, or None
        # Per prompt: its tokens while queued (0 before tokenizing), None once it left.
        self._queued: list[int | None] = [0] * num
        self.prompt_tokens = 0
        self.generated = 0
        self.reserved = 0
        self.closed = False

    def start(self, jobs: list[EngineJob], param: str) -> None:
        """After tokenizing, before the engine: the exact prompt limit (400), the queued
        tokens (429) and the tenant's tokens (429); then watches each job's outputs."""
        adm = self.admission
        lengths = [len(job.prompt_token_ids) for job in jobs]
        check_prompt_tokens(param, lengths, adm.limits)
        if len(jobs) != len(self._queued):  # never expected: keep the counts exact anyway
            raise RuntimeError(f"{len(jobs)} jobs for {len(self._queued)} queue places")
        total = sum(lengths)
        cap = adm.limits.max_queued_tokens
        if cap is not None and adm.queued_tokens and adm.queued_tokens + total > cap:
            adm.reject(REJECT_QUEUED_TOKENS)
            raise rate_limited(
                f"The server's queue is full ({adm.queued_tokens} prompt tokens waiting, at "
                f"most {cap}); retry later.", adm.retry_after())
        if self.rate_limits is not None:
            cost = sum(n + job.params.n * (job.params.max_tokens or 0)
                       for n, job in zip(lengths, jobs))
            self.rate_limits.reserve_tokens(cost, adm.reject)
            self.reserved = cost
        self.prompt_tokens = total
        self._queued = lengths
        adm.queued_tokens += total
        adm._changed()
        for i, job in enumerate(jobs):
            job.watch = _JobWatch(self, i)

    def leave_queue(self, index: int, drained: bool = False) -> None:
        """`drained`: the prompt left because its first output came."""
        tokens = self._queued[index]
        if tokens is not None and not self.closed:
            self._queued[index] = None
            self.admission._leave(tokens, drained)

    def close(self) -> None:
        """Leaves the queue and refunds the unused token reservation; idempotent."""
        if self.closed:
            return
        for i in range(len(self._queued)):
            self.leave_queue(i)
        self.closed = True
        if self.reserved:
            unused = self.reserved - self.prompt_tokens - self.generated
            if unused > 0:
                self.rate_limits.refund_tokens(unused)

    # ---- the deadline -------------------------------------------------------------------

    def _timed_out(self) -> APIError:
        if self.admission.metrics is not None:
            self.admission.metrics.timed_out()
        return request_timeout_error(self.admission.limits.request_timeout or 0.0)

    async def within_deadline(self, work: Awaitable[T]) -> T:
        """Awaits `work`, cancelling it at the deadline (cancelling aborts its engine
        requests) and raising a 504."""
        if self.deadline is None:
            return await work
        try:
            async with asyncio.timeout_at(self.deadline):
                return await work
        except TimeoutError:
            raise self._timed_out() from None

    async def guard_stream(self, chunks: AsyncGenerator[str]) -> AsyncGenerator[str]:
        """The stream under the deadline (each chunk is awaited in a timeout scope of its
        own, so it never fires while the consumer holds the generator), then close()."""
        try:
            while True:
                try:
                    if self.deadline is None:
                        chunk = await anext(chunks)
                    else:
                        async with asyncio.timeout_at(self.deadline):
                            chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    # The timeout cancelled the inner generator at its await: it closed
                    # its engine streams on the way out, which aborted the requests.
                    raise self._timed_out() from None
                yield chunk
        finally:
            await chunks.aclose()  # never suspends: the inner cleanup does not await
            self.close()


class AdmissionMiddleware:
    """Refuses bodies over --max-request-body-bytes with 413 before the app parses them
    (by Content-Length at once, else by counting while reading), and closes a request's
    ticket when its response is over. Plain ASGI, so streaming stays intact."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.admission.limits.max_request_body_bytes
        state = scope.setdefault("state", {})
        try:
            if limit is not None and scope.get("method") in ("POST", "PUT", "PATCH"):
                replay = await self._read_body(scope, receive, limit)
                if replay is None:
                    self.admission.reject(REJECT_BODY_SIZE)
                    await body_too_large(limit).response()(scope, receive, send)
                    return
                receive = replay
            await self.app(scope, receive, send)
        finally:
            ticket = state.get(TICKET_STATE)
            if ticket is not None:
                ticket.close()

    @staticmethod
    async def _read_body(scope: Scope, receive: Receive, limit: int) -> Receive | None:
        """The whole body within `limit`, as a receive that replays it; None if larger."""
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass  # the server rejects a malformed length itself
                break
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                first: Message = message  # a disconnect: the app sees it at once
                break
            body += message.get("body", b"")
            if len(body) > limit:
                return None
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": bytes(body), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        return replay
