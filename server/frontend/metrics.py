"""Prometheus metrics for GET /metrics, named like vLLM's under the `conveyor:` prefix.

One `Metrics` per app, owning its own CollectorRegistry (no module-level state). Three sources:

- request-level series, observed in the front end as each engine request (one prompt, all n
  of its sequences) streams and finishes: token counters, finish reasons, TTFT, inter-token
  latency, end-to-end latency, prompt/generation length histograms;
- engine-side series (running, waiting, KV usage, prefix cache, preemptions), read from the
  engine's SchedulerStats at scrape time: the /metrics handler awaits `get_stats()` and
  hands the snapshot to `render`, which a custom collector turns into families;
- `http_requests_total{route,status}`, counted by `HTTPMetricsMiddleware` with the route
  template (never the raw path). /metrics itself is not counted (like vLLM).

request_queue_time / prefill_time / decode_time come from the engine's own timestamps
(arrival, first scheduling, first token, finish; see RequestTimes), one observation per
finished engine request. Queue time ends at the FIRST scheduling: a request preempted and
admitted again is not queued twice; its wait after preemption falls in prefill or decode.
They add up to at most e2e, which the front end measures from an earlier arrival.

Read at scrape time besides: GPU utilization and memory from NVML (gpu_stats.py; absent
without a GPU) and, with `cost_per_hour`, the running cost (cost.py; absent without it).

With `vllm_names=True` every series is exported a second time under `vllm:` (same values).

Units. prompt/generation tokens count once per engine request and equal the `usage`
numbers of the responses. request_success_total counts sequences (an n=2 request adds
two), each with its finish reason; a sequence cut short by a client disconnect or
cancellation counts as `abort`. Histograms count finished engine requests; TTFT and
inter-token latency are also observed for requests aborted later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.frontend.cost import CostCollector, Usage
from server.frontend.gpu_stats import GPUCollector, GPUStats
from server.outputs import RequestOutput, RequestTimes

PREFIX = "conveyor:"
VLLM_PREFIX = "vllm:"
FINISH_REASONS = ("stop", "length", "abort")

# vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM uses its e2e buckets for the queue / prefill / decode split as well.
REQUEST_TIME_BUCKETS = E2E_BUCKETS


def buckets_1_2_5(maximum: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `maximum` (vLLM's token-count buckets)."""
    out: list[float] = []
    exp = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exp
            if v > maximum:
                return out
            out.append(float(v))
        exp += 1


@dataclass
class _Series:
    """The request-level metrics under one prefix, bound to the model_name label."""

    prompt_tokens: Counter
    generation_tokens: Counter
    success: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    prefill: Histogram
    decode: Histogram
    prompt_hist: Histogram
    gen_hist: Histogram
    http: Counter


def _make_series(registry: CollectorRegistry, p: str, model: str,
                 max_tokens_bucket: int) -> _Series:
    lbl = ["model_name"]
    tok_buckets = buckets_1_2_5(max_tokens_bucket)

    def hist(name: str, doc: str, buckets: Iterable[float]) -> Histogram:
        return Histogram(p + name, doc, lbl, registry=registry,
                         buckets=tuple(buckets)).labels(model)

    success = Counter(p + "request_success_total", "Finished sequences, by finish reason.",
                      ["model_name", "finished_reason"], registry=registry)
    for r in FINISH_REASONS:  # every reason reads 0 before it first happens
        success.labels(model, r)
    return _Series(
        prompt_tokens=Counter(p + "prompt_tokens_total", "Prompt tokens processed.", lbl,
                              registry=registry).labels(model),
        generation_tokens=Counter(p + "generation_tokens_total", "Generation tokens produced.",
                                  lbl, registry=registry).labels(model),
        success=success,
        ttft=hist("time_to_first_token_seconds",
                  "Time from request arrival to the first token out of the engine.",
                  TTFT_BUCKETS),
        itl=hist("inter_token_latency_seconds",
                 "Time between successive engine outputs of a request.", ITL_BUCKETS),
        e2e=hist("e2e_request_latency_seconds",
                 "Time from request arrival to its last token.", E2E_BUCKETS),
        queue=hist("request_queue_time_seconds",
                   "Time from arrival in the engine to first scheduling.",
                   REQUEST_TIME_BUCKETS),
        prefill=hist("request_prefill_time_seconds",
                     "Time from first scheduling to the first token.", REQUEST_TIME_BUCKETS),
        decode=hist("request_decode_time_seconds",
                    "Time from the first token to the last.", REQUEST_TIME_BUCKETS),
        prompt_hist=hist("request_prompt_tokens", "Prompt tokens per finished request.",
                         tok_buckets),
        gen_hist=hist("request_generation_tokens",
                      "Generation tokens per finished request (all n sequences).", tok_buckets),
        http=Counter(p + "http_requests_total", "HTTP requests by route template and status.",
                     ["route", "status"], registry=registry),
    )


class _EngineCollector(Collector):
    """Engine-side families from the snapshot `Metrics.render` was given."""

    def __init__(self, prefixes: list[str], model: str) -> None:
        self.prefixes = prefixes
        self.model = model
        self.snapshot: Mapping[str, float] | None = None

    def collect(self) -> Iterable[Metric]:
        s = self.snapshot
        if s is None:
            return
        for p in self.prefixes:
            gauges = (
                ("num_requests_running", "Sequences running in the engine.", "num_running"),
                ("num_requests_waiting", "Sequences waiting in the engine.", "num_waiting"),
                ("kv_cache_usage_perc", "KV cache usage (0..1).", "kv_cache_usage"),
            )
            for name, doc, key in gauges:
                g = GaugeMetricFamily(p + name, doc, labels=["model_name"])
                g.add_metric([self.model], float(s.get(key, 0.0)))
                yield g
            counters = (
                ("num_preemptions", "Sequences preempted by the engine.", "num_preemptions"),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 "prefix_cache_queries"),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 "prefix_cache_hits"),
                # rate() of this is the share of wall time the engine spends computing.
                ("engine_busy_seconds", "Seconds the engine spent running steps.",
                 "engine_busy_seconds"),
            )
            for name, doc, key in counters:
                c = CounterMetricFamily(p + name, doc, labels=["model_name"])
                c.add_metric([self.model], float(s.get(key, 0.0)))
                yield c


class RequestTracker:
    """Follows one engine request's outputs; `close()` once, whatever way it ended."""

    def __init__(self, metrics: Metrics, prompt_len: int, n: int, arrival: float) -> None:
        self.metrics = metrics
        self.prompt_len = prompt_len
        self.n = n
        self.arrival = arrival
        self.last: float | None = None
        self.generated = 0
        self.reasons: dict[int, str] = {}
        self.finished = False
        self.closed = False
        self.times: RequestTimes | None = None

    def on_output(self, out: RequestOutput) -> None:
        t = time.monotonic()
        new = 0
        for comp in out.outputs:
            new += len(comp.token_ids)
            if comp.finish_reason is not None:
                self.reasons[comp.index] = comp.finish_reason
        if new:
            for s in self.metrics.series:
                if self.last is None:
                    s.ttft.observe(t - self.arrival)
                else:
                    s.itl.observe(t - self.last)
            self.last = t
            self.generated += new
        if out.finished:
            self.finished = True
            self.times = out.metrics

    def close(self, aborted: bool) -> None:
        """`aborted`: the request was cancelled or its stream closed early (client gone)."""
        if self.closed:
            return
        self.closed = True
        t = time.monotonic()
        reasons = list(self.reasons.values())
        if not self.finished and aborted:
            reasons += ["abort"] * (self.n - len(reasons))
        usage = self.metrics.usage
        usage.output_tokens += self.generated
        usage.finished_requests += int(self.finished)
        times = self.times
        for s in self.metrics.series:
            s.prompt_tokens.inc(self.prompt_len)
            s.generation_tokens.inc(self.generated)
            for r in reasons:
                s.success.labels(self.metrics.model_name, r).inc()
            if self.finished:
                s.e2e.observe(t - self.arrival)
                s.prompt_hist.observe(self.prompt_len)
                s.gen_hist.observe(self.generated)
            if self.finished and times is not None:
                s.queue.observe(times.queue_time)
                if times.prefill_time is not None and times.decode_time is not None:
                    s.prefill.observe(times.prefill_time)
                    s.decode.observe(times.decode_time)


class Metrics:
    """All of the server's Prometheus series, in a registry of their own."""

    def __init__(self, model_name: str, vllm_names: bool = False,
                 max_tokens_bucket: int = 1_000_000, *, cost_per_hour: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 gpu_stats: GPUStats | None = None) -> None:
        """`cost_per_hour` (USD) adds the cost series, timed by `clock` from now on;
        `gpu_stats` (default: the real NVML, loaded at the first scrape) feeds the GPU
        series."""
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.prefixes = [PREFIX] + ([VLLM_PREFIX] if vllm_names else [])
        self.series = [_make_series(self.registry, p, model_name, max_tokens_bucket)
                       for p in self.prefixes]
        self._engine = _EngineCollector(self.prefixes, model_name)
        self.registry.register(self._engine)
        self.registry.register(GPUCollector(self.prefixes, model_name,
                                            gpu_stats if gpu_stats is not None else GPUStats()))
        self.usage = Usage()
        if cost_per_hour is not None:
            self.registry.register(CostCollector(self.prefixes, model_name, cost_per_hour,
                                                 self.usage, clock))

    def track(self, prompt_len: int, n: int, arrival: float) -> RequestTracker:
        return RequestTracker(self, prompt_len, n, arrival)

    def count_http(self, route: str, status: int) -> None:
        for s in self.series:
            s.http.labels(route, str(status)).inc()

    def render(self, engine_stats: Mapping[str, float] | None) -> bytes:
        """The text exposition; engine series come from `engine_stats` (omitted if None)."""
        self._engine.snapshot = engine_stats
        try:
            return generate_latest(self.registry)
        finally:
            self._engine.snapshot = None


UNMATCHED = "unmatched"
METRICS_PATH = "/metrics"


class RouteTable:
    """Maps a request's method and path to its route template ("/v1/models/{model_id}").

    Built from the (prefix, routes) pairs the app mounts rather than from what routing
    leaves in the scope: requests refused before routing (auth) get their template too, and
    a router mounted under two prefixes yields two templates.
    """

    def __init__(self, mounts: Iterable[tuple[str, Iterable[BaseRoute]]]) -> None:
        self.entries: list[tuple[object, frozenset[str] | None, str]] = []
        for prefix, routes in mounts:
            for route in routes:
                path = getattr(route, "path", None)
                if path is None:
                    continue
                regex, template, _ = compile_path(prefix + path)
                methods = getattr(route, "methods", None)
                self.entries.append((regex, frozenset(methods) if methods else None, template))

    def template(self, method: str, path: str) -> str:
        fallback = UNMATCHED
        for regex, methods, template in self.entries:
            if regex.match(path):  # type: ignore[attr-defined]
                if methods is None or method in methods:
                    return template
                fallback = template  # the path exists, the method does not (405)
        return fallback


class HTTPMetricsMiddleware:
    """Counts requests by route template and status (plain ASGI: keeps streaming intact).

    Outermost, so requests that auth refuses count too. GET /metrics is not counted.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: RouteTable) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self.routes.template(scope.get("method", ""), scope.get("path", ""))
            self.metrics.count_http(route, status)
