"""Async streaming client: sends each request, timestamps every output chunk, never raises.

Speaks the OpenAI wire format over httpx: /v1/completions or /v1/chat/completions with
`stream: true` and `stream_options.include_usage`, so token counts come from the server's
usage (counted chunks when a server sends none). Every failure becomes a record with an error
type: `http_<status>`, `timeout`, `connection`, `stream_error` (an error event inside the
stream), `protocol` (a body that is not the expected SSE JSON) or the exception's class name.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from server.benchmarks.metrics import RequestRecord
from server.benchmarks.workloads import RequestSpec

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class ServerUnreachable(RuntimeError):
    """The server did not answer at all (refused, DNS, timeout)."""


@dataclass(frozen=True)
class ClientConfig:
    base_url: str
    model: str
    endpoint: str = "completions"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def normalize_base_url(url: str) -> str:
    """`http://host:port`, `.../` and `.../v1` all mean the server root."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def build_payload(spec: RequestSpec, cfg: ClientConfig) -> dict:
    """The JSON body for one request."""
    body: dict = {"model": cfg.model, "max_tokens": spec.output_len,
                  "temperature": cfg.temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if cfg.endpoint == "chat":
        if spec.messages is None:
            raise ValueError("the chat endpoint needs messages")
        body["messages"] = spec.messages
    else:
        if spec.prompt is None:
            raise ValueError("the completions endpoint needs a prompt (not messages)")
        body["prompt"] = spec.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def chunk_text(obj: dict) -> str:
    """The output text a stream chunk carries (completions text or chat delta content)."""
    parts = []
    for choice in obj.get("choices") or ():
        if "text" in choice:
            parts.append(choice.get("text") or "")
        delta = choice.get("delta") or {}
        parts += [delta.get(k) or "" for k in ("content", "reasoning_content", "reasoning")]
    return "".join(parts)


def _error_message(resp: httpx.Response) -> str:
    try:
        err = resp.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        pass
    return resp.text[:300]


async def _consume(resp: httpx.Response, rec: RequestRecord, t_start: float) -> None:
    """Reads the SSE stream into `rec`; raises _StreamError on an error event."""
    any_choice_at: float | None = None
    usage = None
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, comments, event names
        data = line[5:].strip()
        if data == "[DONE]":
            break
        now = time.perf_counter() - t_start
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise _StreamError("protocol", f"not JSON: {data[:200]!r}") from None
        if "error" in obj:
            err = obj["error"]
            raise _StreamError("stream_error", str(err.get("message") if isinstance(err, dict)
                                                   else err))
        if obj.get("choices"):
            any_choice_at = now if any_choice_at is None else any_choice_at
            if chunk_text(obj):
                rec.chunk_times.append(now)
        if obj.get("usage"):
            usage = obj["usage"]
    if not rec.chunk_times and any_choice_at is not None:
        rec.chunk_times.append(any_choice_at)  # output decoded to no text (e.g. specials)
    if usage is not None:
        rec.prompt_tokens = usage.get("prompt_tokens")
        rec.output_tokens = int(usage.get("completion_tokens") or 0)
    else:
        rec.output_tokens = len(rec.chunk_times)


class _StreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _classify(exc: BaseException) -> str:
    if isinstance(exc, _StreamError):
        return exc.kind
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError
                  | httpx.WriteError):
        return "connection"
    return type(exc).__name__


async def send_request(client: httpx.AsyncClient, cfg: ClientConfig, spec: RequestSpec,
                       rec: RequestRecord, t0: float) -> RequestRecord:
    """Sends one streaming request, filling `rec` (times relative to `t0`). Never raises
    except for cancellation."""
    body = build_payload(spec, cfg)
    t_start = time.perf_counter()
    rec.start = t_start - t0
    try:
        async with asyncio.timeout(cfg.timeout_s):
            async with client.stream("POST", ENDPOINT_PATHS[cfg.endpoint], json=body,
                                     headers=cfg.headers()) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    rec.error_type = f"http_{resp.status_code}"
                    rec.error = _error_message(resp)
                else:
                    await _consume(resp, rec, t_start)
                    rec.success = True
    except Exception as exc:  # one failed request never stops the run
        rec.error_type = _classify(exc)
        rec.error = str(exc) or type(exc).__name__
    rec.end = time.perf_counter() - t0
    return rec


def make_client(cfg: ClientConfig, max_connections: int | None) -> httpx.AsyncClient:
    # No pool limit by default: an open-loop run must not queue inside the client.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=cfg.base_url, limits=limits,
                             timeout=httpx.Timeout(cfg.timeout_s, connect=30.0))


async def run_requests(cfg: ClientConfig, specs: Sequence[RequestSpec],
                       offsets: Sequence[float], records: list[RequestRecord],
                       max_concurrency: int | None = None,
                       on_done: Callable[[RequestRecord], None] | None = None) -> None:
    """Sends `specs[i]` at `offsets[i]` seconds (at most `max_concurrency` in flight) and
    appends each finished record to `records`.

    Records land in `records` as they finish so that an interrupted run keeps what it got;
    their times count from the moment the first request was due.
    """
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with make_client(cfg, max_concurrency) as client:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            spec = specs[i]
            rec = RequestRecord(index=i, scheduled=offsets[i],
                                expected_prompt_tokens=spec.prompt_len,
                                expected_output_tokens=spec.output_len)
            if sem is not None:
                async with sem:
                    await send_request(client, cfg, spec, rec, t0)
            else:
                await send_request(client, cfg, spec, rec, t0)
            records.append(rec)
            if on_done is not None:
                on_done(rec)

        tasks = []
        try:
            for i in range(len(specs)):
                delay = t0 + offsets[i] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()


def get_json(base_url: str, path: str, api_key: str | None, method: str = "GET",
             body: dict | None = None, timeout: float = 30.0, parse: bool = True) -> dict:
    """One small synchronous call (model list, detokenize); ServerUnreachable when the server
    does not answer, httpx.HTTPStatusError on an error status."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        resp = httpx.request(method, base_url + path, json=body, headers=headers,
                             timeout=timeout)
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"cannot reach {base_url} ({type(exc).__name__}: {exc}); "
                                "is the server running?") from None
    resp.raise_for_status()
    return resp.json() if parse else {}

