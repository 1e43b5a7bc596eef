"""Per-request log lines (`--log-format json`) and the JSON formatter for the server's logs.

The lifecycle middleware opens one `RequestRecord` per HTTP request and puts it in a
context variable; the serving code's metrics trackers (wrapped by `RecordingMetrics`) fill
in token counts and TTFT as the engine streams, since only they see the engine outputs.
Context variables reach the response-streaming and per-job pump tasks because tasks copy
the context they are created in, and the record itself is a shared mutable object.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from server.frontend.metrics import Metrics, RequestTracker
from server.outputs import RequestOutput

REQUEST_LOGGER = "conveyor.request"

current_record: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "conveyor_request_record", default=None)


@dataclass
class RequestRecord:
    """What one HTTP request's log line says; token fields stay None when unknown."""

    request_id: str
    method: str
    route: str
    start: float = field(default_factory=time.monotonic)
    status: int | None = None
    prompt_tokens: int | None = None
    generation_tokens: int | None = None
    ttft_s: float | None = None
    prompt: Any = None  # set only with --log-prompts

    def add_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        # Several engine jobs (a list of prompts) add up, like the response's usage.
        self.prompt_tokens = (self.prompt_tokens or 0) + prompt_tokens
        self.generation_tokens = (self.generation_tokens or 0) + generation_tokens

    def first_token(self, t: float) -> None:
        ttft = t - self.start
        if self.ttft_s is None or ttft < self.ttft_s:
            self.ttft_s = ttft

    def fields(self, end: float) -> dict[str, Any]:
        """The log line's JSON object (rounded to the millisecond: logs, not benchmarks)."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1000, 3),
            "latency_ms": round((end - self.start) * 1000, 3),
        }
        if self.prompt is not None:
            out["prompt"] = self.prompt
        return out


class _RecordingTracker:
    """A RequestTracker that also reports tokens and TTFT to the request's record."""

    def __init__(self, inner: RequestTracker, record: RequestRecord) -> None:
        self.inner = inner
        self.record = record
        self.seen_token = False

    def on_output(self, out: RequestOutput) -> None:
        self.inner.on_output(out)
        if not self.seen_token and any(c.token_ids for c in out.outputs):
            self.seen_token = True
            self.record.first_token(time.monotonic())

    def close(self, aborted: bool) -> None:
        if self.inner.closed:
            return
        self.inner.close(aborted)
        self.record.add_tokens(self.inner.prompt_len, self.inner.generated)


class RecordingMetrics:
    """Stands in for `Metrics` in the serving context: same series, and each tracker also
    feeds the current request's log record (when there is one)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metrics, name)

    def track(self, prompt_len: int, n: int, arrival: float) -> Any:
        tracker = self._metrics.track(prompt_len, n, arrival)
        record = current_record.get()
        return tracker if record is None else _RecordingTracker(tracker, record)


def prompt_of(body: bytes) -> Any:
    """The prompt or messages of a request body, for --log-prompts (None if unreadable)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    return data.get("prompt", data.get("messages"))


def log_request(record: RequestRecord, end: float | None = None) -> None:
    """One INFO line on the `conveyor.request` logger; JSONFormatter renders the fields."""
    fields = record.fields(time.monotonic() if end is None else end)
    logging.getLogger(REQUEST_LOGGER).info("request %s %s %s", record.method, record.route,
                                           record.status, extra={"fields": fields})


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)
