"""Graceful shutdown and per-request bookkeeping: X-Request-Id, draining, request logs.

`LifecycleMiddleware` (plain ASGI, so streaming stays intact) gives every request an id
(the client's `X-Request-Id`, or a fresh one) and echoes it in the response headers. While
the server drains (`Lifecycle.drain`, started on SIGTERM/SIGINT by server.py) readiness
answers 503 and new generation requests are refused with an OpenAI-shaped 503, while the
generation requests already running may finish. Those still running at the deadline are
cut: a stream gets a last chunk with finish_reason "abort" and `[DONE]`, a request whose
response has not started gets a 503; cancelling the handler aborts its engine requests.

The abort chunk is written here rather than by the serving code: the engine has no way to
finish a request with a final output, so the middleware, which has seen the stream's
chunks, closes it in the same shape (id, object, created, model of the last chunk).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.frontend.errors import SERVER_ERROR, error_body
from server.frontend.metrics import RouteTable
from server.frontend.request_log import RequestRecord, current_record, log_request, prompt_of

REQUEST_ID_HEADER = b"x-request-id"
# Client ids longer than this, or with other characters, are replaced (they reach logs).
_MAX_ID_LEN = 128
_ID_OK = re.compile(r"^[\x21-\x7e]+$")
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions",
                              "/openai/v1/completions", "/openai/v1/chat/completions"})
_READINESS = re.compile(r"^(/health|/v2/health/ready|/v2/models/[^/]+/ready)$")
# Request bodies kept to count choices and (with --log-prompts) log the prompt.
_MAX_KEPT_BODY = 1 << 20
# How long cut requests get to unwind after their cancellation.
_CUT_GRACE_S = 5.0
_POLL_S = 0.02


def shutting_down_body() -> dict[str, Any]:
    return error_body("The server is shutting down; retry on another replica.",
                      SERVER_ERROR, code="server_shutting_down")


def request_id_of(scope: Scope) -> str:
    """The client's X-Request-Id when it is sane, else a fresh random one."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER:
            rid = value.decode("latin-1")
            if len(rid) <= _MAX_ID_LEN and _ID_OK.match(rid):
                return rid
            break
    return uuid.uuid4().hex


class _InFlight:
    """One generation request running under the middleware; `cut()` ends it early."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.task: asyncio.Future | None = None
        self.body = bytearray()
        self.started = False
        self.streaming = False
        self.cut_requested = False
        self.complete = False  # the app sent its last body message
        self.last_chunk: bytes | None = None
        self.finished_indices: set[int] = set()

    def cut(self) -> None:
        self.cut_requested = True
        if self.task is not None:
            self.task.cancel()

    def observe(self, body: bytes) -> None:
        """Remember the stream's last data chunk and which choices already finished.
        Substring checks first: this runs for every token."""
        if b'"choices"' not in body:
            return
        self.last_chunk = body
        if b'"finish_reason":"' in body:
            for event in _events(body):
                for choice in event.get("choices") or ():
                    if choice.get("finish_reason") is not None:
                        self.finished_indices.add(choice.get("index", 0))

    def num_choices(self) -> int:
        try:
            req = json.loads(bytes(self.body))
        except (ValueError, UnicodeDecodeError):
            return 1
        if not isinstance(req, dict):
            return 1
        n = req.get("n") if isinstance(req.get("n"), int) else 1
        prompt = req.get("prompt")
        # A list of prompts (strings or token-id lists) streams len(prompt) * n choices.
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return len(prompt) * n
        return n

    def abort_tail(self, model: str) -> bytes:
        """The stream's end after a cut: an abort chunk for the unfinished choices, [DONE]."""
        events = _events(self.last_chunk) if self.last_chunk else []
        last = events[-1] if events else {}
        chat = self.path.endswith("/chat/completions")
        unfinished = [i for i in range(self.num_choices()) if i not in self.finished_indices]
        tail = b""
        if unfinished:
            if chat:
                choices = [{"index": i, "delta": {}, "logprobs": None, "finish_reason": "abort",
                            "stop_reason": None} for i in unfinished]
            else:
                choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "abort",
                            "stop_reason": None} for i in unfinished]
            chunk = {"id": last.get("id", ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex),
                     "object": last.get("object",
                                        "chat.completion.chunk" if chat else "text_completion"),
                     "created": last.get("created", int(time.time())),
                     "model": last.get("model", model), "choices": choices}
            tail = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        return tail + b"data: [DONE]\n\n"


def _events(body: bytes) -> list[dict[str, Any]]:
    out = []
    for part in body.split(b"\n\n"):
        if part.startswith(b"data: {"):
            try:
                out.append(json.loads(part[len(b"data: "):]))
            except ValueError:
                continue
    return out


class Lifecycle:
    """The server's draining state and its running generation requests (one per app)."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight: set[_InFlight] = set()

    async def drain(self, timeout: float) -> int:
        """Refuse new work, wait up to `timeout` s for running generation requests, cut the
        rest; returns how many were cut."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        cut = list(self.in_flight)
        for flight in cut:
            flight.cut()
        deadline = time.monotonic() + _CUT_GRACE_S
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
        return len(cut)


class LifecycleMiddleware:
    """Request ids, drain gating and (with `log_json`) one log line per finished request."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, routes: RouteTable,
                 served_model_name: str, log_json: bool = False,
                 log_prompts: bool = False) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.routes = routes
        self.model = served_model_name
        self.log_json = log_json
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        method, path = scope.get("method", ""), scope.get("path", "")
        record = RequestRecord(rid, method, self.routes.template(method, path))
        token = current_record.set(record)
        header = (REQUEST_ID_HEADER, rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
                record.status = message["status"]
            await send(message)

        try:
            generation = method == "POST" and path in GENERATION_PATHS
            if self.lifecycle.draining and (generation or _READINESS.match(path)):
                await _send_json(send_with_id, 503, shutting_down_body())
            elif generation:
                await self._generation(scope, receive, send_with_id, path, record)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            current_record.reset(token)
            if self.log_json:
                log_request(record)

    async def _generation(self, scope: Scope, receive: Receive, send: Send, path: str,
                          record: RequestRecord) -> None:
        flight = _InFlight(path)

        async def keep_body() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(flight.body) < _MAX_KEPT_BODY:
                flight.body += message.get("body", b"")
            return message

        async def watch(message: Message) -> None:
            if flight.cut_requested:
                return  # the middleware writes the end of this response itself
            if message["type"] == "http.response.start":
                flight.started = True
                flight.streaming = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                       for k, v in message.get("headers", ()))
            elif message["type"] == "http.response.body" and flight.streaming:
                flight.observe(message.get("body", b""))
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                flight.complete = True

        self.lifecycle.in_flight.add(flight)
        # A task of its own, so a drain can cancel the handler without cancelling us.
        flight.task = asyncio.ensure_future(self.app(scope, keep_body, watch))
        try:
            try:
                await flight.task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if not flight.cut_requested or (current is not None and current.cancelling()):
                    raise
                await self._finish_cut(flight, send)
        finally:
            self.lifecycle.in_flight.discard(flight)
            if self.log_prompts:
                record.prompt = prompt_of(bytes(flight.body))

    async def _finish_cut(self, flight: _InFlight, send: Send) -> None:
        if flight.complete:
            return
        if flight.streaming:
            await send({"type": "http.response.body", "body": flight.abort_tail(self.model),
                        "more_body": False})
        elif not flight.started:
            await _send_json(send, 503, shutting_down_body())
        else:  # a JSON response cut mid-body: nothing valid can follow, just end it
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data, "more_body": False})
