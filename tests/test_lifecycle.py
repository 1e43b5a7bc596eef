"""X-Request-Id, JSON request logs and graceful shutdown (draining).

Unit tests drive the app over the scripted engine (TestClient, or raw ASGI where a drain
must run while a stream is open); the last tests send SIGTERM to a real server process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from server.cli import build_parser
from server.frontend.app import build_app
from server.frontend.request_log import REQUEST_LOGGER, JSONFormatter
from tests.fake_engine import FakeEngineClient
from tests.server_process import ServerProcess

MODEL = "fake-model"
SHUTTING_DOWN = {"type": "server_error", "param": None, "code": "server_shutting_down"}


def make(**kwargs) -> tuple[TestClient, FakeEngineClient]:
    engine = FakeEngineClient()
    app = build_app(engine, engine.tokenizer, MODEL, None, **kwargs)
    return TestClient(app, raise_server_exceptions=False), engine


class _Lines(logging.Handler):
    """Collects the request logger's lines as the JSON formatter writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JSONFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def request_lines():
    handler = _Lines()
    log = logging.getLogger(REQUEST_LOGGER)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


# ---- X-Request-Id ---------------------------------------------------------------------------

def test_request_id_is_echoed():
    client, _ = make()
    r = client.get("/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123"
    r = client.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "c-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "c-1"
    assert r.json()["id"].startswith("cmpl-")  # response ids are unchanged


def test_request_id_generated_when_absent_or_unusable():
    client, _ = make()
    ids = [client.get("/health").headers["x-request-id"] for _ in range(2)]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]
    r = client.get("/health", headers={"X-Request-Id": "x" * 129})
    assert len(r.headers["x-request-id"]) == 32
    # Errors carry it too.
    r = client.get("/nowhere", headers={"X-Request-Id": "e-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "e-1"


# ---- request log lines ------------------------------------------------------------------------

def _parse(lines: list[str]) -> list[dict]:
    out = [json.loads(line) for line in lines]
    for d in out:
        assert isinstance(d.pop("time"), str) and d["latency_ms"] >= 0
        d.pop("latency_ms")
    return out


def test_json_log_line_for_completion(request_lines):
    client, _ = make(log_json=True)
    r = client.post("/v1/completions", json={"prompt": "hi"}, headers={"X-Request-Id": "r1"})
    assert r.status_code == 200
    (line,) = _parse(request_lines)
    assert line.pop("ttft_ms") >= 0
    assert line == {"level": "INFO", "logger": "conveyor.request", "request_id": "r1",
                    "method": "POST", "route": "/v1/completions", "status": 200,
                    "prompt_tokens": 3, "generation_tokens": 5}


def test_json_log_line_for_stream_and_other_routes(request_lines):
    client, _ = make(log_json=True)
    with client.stream("POST", "/v1/chat/completions", headers={"X-Request-Id": "s1"},
                       json={"messages": [{"role": "user", "content": "hi"}],
                             "stream": True}) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    assert body.endswith("data: [DONE]\n\n")
    client.get("/v1/models/nope", headers={"X-Request-Id": "m1"})
    stream, missing = _parse(request_lines)
    assert stream.pop("ttft_ms") >= 0
    assert stream == {"level": "INFO", "logger": "conveyor.request", "request_id": "s1",
                      "method": "POST", "route": "/v1/chat/completions", "status": 200,
                      "prompt_tokens": 21, "generation_tokens": 5}
    assert missing == {"level": "INFO", "logger": "conveyor.request", "request_id": "m1",
                       "method": "GET", "route": "/v1/models/{model_id}", "status": 404,
                       "prompt_tokens": None, "generation_tokens": None, "ttft_ms": None}


def test_prompts_logged_only_when_asked(request_lines):
    client, _ = make(log_json=True)
    client.post("/v1/completions", json={"prompt": "secret"})
    client, _ = make(log_json=True, log_prompts=True)
    client.post("/v1/completions", json={"prompt": "secret"})
    plain, with_prompt = (json.loads(line) for line in request_lines)
    assert "secret" not in json.dumps(plain) and "prompt" not in plain
    assert with_prompt["prompt"] == "secret"


def test_no_request_lines_in_text_mode(request_lines):
    client, _ = make()
    client.post("/v1/completions", json={"prompt": "hi"})
    assert request_lines == []


def test_cli_flags_and_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.shutdown_timeout, args.log_format, args.log_prompts) == (30.0, "text", False)
    args = build_parser().parse_args(["serve", "--shutdown-timeout", "2.5", "--log-format",
                                      "json", "--log-prompts"])
    assert (args.shutdown_timeout, args.log_format, args.log_prompts) == (2.5, "json", True)


# ---- draining (unit) --------------------------------------------------------------------------

def test_draining_refuses_readiness_and_generation_only():
    client, engine = make()
    client.app.state.lifecycle.draining = True
    for path in ("/health", "/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        r = client.get(path)
        err = r.json()["error"]
        assert r.status_code == 503
        assert {k: err[k] for k in ("type", "param", "code")} == SHUTTING_DOWN
    for path in ("/v1/completions", "/openai/v1/chat/completions"):
        r = client.post(path, json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_shutting_down"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v1/models").status_code == 200
    assert engine.requests == []


async def _asgi_post(app, path: str, body: dict, messages: list[dict]) -> None:
    payload = json.dumps(body).encode()
    gone = asyncio.Event()
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "server": ("test", 80),
             "client": ("c", 1), "headers": [(b"content-type", b"application/json")]}
    await app(scope, receive, send)


def _run_drain(body: dict, delay: float, timeout: float) -> tuple[list[dict], int, list]:
    engine = FakeEngineClient(delay=delay)
    app = build_app(engine, engine.tokenizer, MODEL, None)
    messages: list[dict] = []

    async def main() -> int:
        request = asyncio.create_task(_asgi_post(app, "/v1/completions", body, messages))
        await asyncio.sleep(delay * 2.5)
        cut = await app.state.lifecycle.drain(timeout)
        await asyncio.wait_for(request, 5)
        return cut

    cut = asyncio.run(main())
    return messages, cut, engine.aborted


def _sse_events(messages: list[dict]) -> list[str]:
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return [e for e in body.decode().split("\n\n") if e]


def test_drain_lets_running_stream_finish():
    messages, cut, aborted = _run_drain({"prompt": "hi", "stream": True}, 0.02, 5.0)
    assert cut == 0 and aborted == []
    events = _sse_events(messages)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"
    assert "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1]) == "Hello"


def test_drain_timeout_aborts_stream_cleanly():
    messages, cut, aborted = _run_drain({"prompt": "hi", "stream": True}, 0.1, 0.0)
    assert cut == 1 and len(aborted) == 1
    events = _sse_events(messages)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    last = chunks[-1]
    assert last["choices"] == [{"index": 0, "text": "", "logprobs": None,
                                "finish_reason": "abort", "stop_reason": None}]
    assert (last["id"], last["object"], last["model"]) == (
        chunks[0]["id"], "text_completion", MODEL)
    assert 1 <= len(chunks) - 1 < 5  # some tokens, not all of "Hello"
    assert messages[-1] == {"type": "http.response.body", "body": messages[-1]["body"],
                            "more_body": False}


def test_drain_timeout_refuses_unfinished_json_response():
    messages, cut, aborted = _run_drain({"prompt": "hi"}, 0.1, 0.0)
    assert cut == 1 and len(aborted) == 1
    assert messages[0]["status"] == 503
    body = json.loads(b"".join(m.get("body", b"") for m in messages[1:]))
    assert body["error"]["code"] == "server_shutting_down"


# ---- a real process --------------------------------------------------------------------------

def _stream_then_sigterm(server: ServerProcess, max_tokens: int,
                         check_health: bool = True) -> tuple[list[str], list[int]]:
    """Starts a long stream, sends SIGTERM after its first chunk, reads health during the
    drain (with `check_health`); returns the stream's data lines and the statuses seen."""
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "n": 4, "temperature": 0.8}
    health: list[int] = []
    lines: list[str] = []
    with httpx.Client(base_url=server.base_url, timeout=60) as client, \
            client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        it = (line for line in r.iter_lines() if line.startswith("data: "))
        lines.append(next(it))
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (5 if check_health else 0)
        while time.monotonic() < deadline:  # the signal is handled asynchronously
            health.append(httpx.get(server.base_url + "/health", timeout=5).status_code)
            if health[-1] == 503:
                refused = httpx.post(server.base_url + "/v1/completions", timeout=5,
                                     json={"prompt": "x", "max_tokens": 1})
                health.append(refused.status_code)
                break
            time.sleep(0.01)
        lines.extend(it)
    return lines, health


def _finish_reasons(lines: list[str]) -> dict[int, str]:
    reasons = {}
    for line in lines[:-1]:
        for c in json.loads(line[6:])["choices"]:
            if c["finish_reason"] is not None:
                reasons[c["index"]] = c["finish_reason"]
    return reasons


def test_sigterm_drains_then_exits_zero(tiny_model_factory):
    server = ServerProcess(tiny_model_factory("llama"), "--num-kv-blocks", "256")
    try:
        lines, health = _stream_then_sigterm(server, 150)
        assert health[-2:] == [503, 503]
        assert lines[-1] == "data: [DONE]"
        assert _finish_reasons(lines) == {i: "length" for i in range(4)}
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def test_sigterm_short_timeout_aborts_streams(tiny_model_factory):
    server = ServerProcess(tiny_model_factory("llama"), "--num-kv-blocks", "256",
                           "--shutdown-timeout", "0.2")
    try:
        # No health checks: a 0.2 s drain may be over (socket closed) before they run.
        lines, _ = _stream_then_sigterm(server, 480, check_health=False)
        assert lines[-1] == "data: [DONE]"
        assert _finish_reasons(lines) == {i: "abort" for i in range(4)}
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
