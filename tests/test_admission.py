"""Admission control and request limits against a scripted engine: the front-end queue
(429 + Retry-After, counts back to 0), body size (413), prompt length, n, max_tokens, stop
strings, and --request-timeout (504 or an SSE error event, the engine request aborted)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from server.frontend.admission import Admission
from server.frontend.app import build_app
from server.frontend.request_limits import RequestLimits, max_token_bytes, min_tokens
from server.outputs import RequestOutput
from server.sampling_params import SamplingParams
from tests.fake_engine import FakeEngineClient
from tests.openai_errors import assert_error

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "hi"}]


@dataclass
class GatedEngine(FakeEngineClient):
    """Holds every request before its first output until `gate` opens."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        self.held += 1
        await self.gate.wait()
        async for out in super().generate(request_id, prompt, prompt_token_ids, params,
                                          **kwargs):
            yield out


def make(limits: RequestLimits | None = None, **engine_kwargs):
    engine = FakeEngineClient(**engine_kwargs)
    app = build_app(engine, engine.tokenizer, MODEL, None, limits=limits)
    return TestClient(app, raise_server_exceptions=False), engine, app.state.ctx.admission


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in {"model_name": MODEL, **labels}.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.M)
    assert m, f"{name}{{{want}}} not exported"
    return float(m.group(1))


async def until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


# ---- the front-end queue -------------------------------------------------------------------

def test_queue_full_is_refused_before_tokenizing_then_drains_to_zero():
    async def run() -> None:
        engine = GatedEngine()
        app = build_app(engine, engine.tokenizer, MODEL, None,
                        limits=RequestLimits(max_num_queued_requests=2))
        adm = app.state.ctx.admission
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://t") as c:
            first = [asyncio.create_task(c.post("/v1/completions",
                                                json={"prompt": p, "max_tokens": 2}))
                     for p in ("ab", "cd")]
            await until(lambda: engine.held == 2)
            assert (adm.queued_requests, adm.queued_tokens) == (2, 6)
            r = await c.post("/v1/completions", json={"prompt": "refused", "max_tokens": 2})
            err = assert_error(r, 429, None, "rate_limit_exceeded", type="rate_limit_error")
            assert "queue is full" in err["message"]
            assert r.headers["retry-after"] == "1"  # nothing drained yet to estimate from
            assert "refused" not in [text for text, _ in engine.tokenizer.calls]
            text = (await c.get("/metrics")).text
            assert metric(text, "conveyor:frontend_queued_requests") == 2
            assert metric(text, "conveyor:frontend_queued_prompt_tokens") == 6
            engine.gate.set()
            assert [(await t).status_code for t in first] == [200, 200]
            assert (adm.queued_requests, adm.queued_tokens) == (0, 0)
            assert (await c.post("/v1/completions", json={"prompt": "x"})).status_code == 200
            text = (await c.get("/metrics")).text
        assert metric(text, "conveyor:requests_rejected_total", reason="queued_requests") == 1
        assert metric(text, "conveyor:requests_rejected_total", reason="queued_tokens") == 0
        assert metric(text, "conveyor:frontend_queued_requests") == 0

    asyncio.run(run())


def test_queued_tokens_are_checked_after_tokenizing_and_a_lone_request_always_fits():
    async def run() -> None:
        engine = GatedEngine()
        app = build_app(engine, engine.tokenizer, MODEL, None,
                        limits=RequestLimits(max_queued_tokens=5))
        adm = app.state.ctx.admission
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://t") as c:
            # 8 tokens > 5, but the queue is empty: admitted rather than refused forever.
            big = asyncio.create_task(c.post("/v1/completions", json={"prompt": "abcdefg"}))
            await until(lambda: engine.held == 1)
            assert adm.queued_tokens == 8
            r = await c.post("/v1/chat/completions", json={"messages": CHAT})
            assert_error(r, 429, None, "rate_limit_exceeded", type="rate_limit_error")
            assert int(r.headers["retry-after"]) >= 1
            assert len(engine.tokenizer.calls) == 2  # tokenized, then refused
            assert engine.held == 1  # never reached the engine
            engine.gate.set()
            assert (await big).status_code == 200
            assert (adm.queued_requests, adm.queued_tokens) == (0, 0)

    asyncio.run(run())


def test_each_prompt_leaves_the_queue_at_its_first_output():
    adm = Admission(RequestLimits())

    async def run() -> None:
        state = SimpleNamespace()
        ticket = adm.admit(SimpleNamespace(prompt=["a", "bb"]), state, 64)
        assert state.admission_ticket is ticket and adm.queued_requests == 2
        jobs = [SimpleNamespace(prompt_token_ids=[1] * k, params=SamplingParams(max_tokens=3))
                for k in (2, 3)]
        ticket.start(jobs, "prompt")  # type: ignore[arg-type]
        assert (adm.queued_requests, adm.queued_tokens) == (2, 5)
        out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7])])
        jobs[1].watch.on_output(out)
        jobs[1].watch.on_output(out)  # only the first output counts
        assert (adm.queued_requests, adm.queued_tokens) == (1, 2)
        jobs[0].watch.close(aborted=True)  # ended without output (error, abort)
        assert (adm.queued_requests, adm.queued_tokens) == (0, 0)
        ticket.close()
        ticket.close()
        assert (adm.queued_requests, adm.queued_tokens) == (0, 0)

    asyncio.run(run())


def test_retry_after_follows_the_recent_drain_rate():
    now = [100.0]
    adm = Admission(RequestLimits(max_num_queued_requests=None), clock=lambda: now[0])

    async def run() -> None:
        tickets = [adm.admit(SimpleNamespace(prompt="x"), SimpleNamespace(), 64)
                   for _ in range(10)]
        for t in tickets[:4]:  # four get their first output, one a second: 1 request/s
            t.leave_queue(0, drained=True)
            now[0] += 1.0
        now[0] -= 1.0
        tickets[4].close()  # an error leaves too, but says nothing of the drain rate
        assert adm.queued_requests == 5
        assert adm.retry_after() == pytest.approx(5.0)
        tickets[4] = adm.admit(SimpleNamespace(prompt="x"), SimpleNamespace(), 64)
        assert adm.queued_requests == 6
        assert adm.retry_after() == pytest.approx(6.0)
        adm.limits = RequestLimits(max_num_queued_requests=6)
        with pytest.raises(Exception) as info:
            adm.admit(SimpleNamespace(prompt="x"), SimpleNamespace(), 64)
        assert info.value.status == 429 and info.value.headers == {"Retry-After": "6"}

    asyncio.run(run())


def test_counts_return_to_zero_after_streams_errors_and_refusals():
    client, engine, adm = make()
    body = {"prompt": ["a", "b"], "n": 2, "stream": True}
    assert client.post("/v1/completions", json=body).text.endswith("data: [DONE]\n\n")
    assert client.post("/v1/chat/completions", json={"messages": CHAT}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "top_p": 7}).status_code == 400
    assert client.post("/v1/completions", json={"prompt": "x" * 70}).status_code == 400
    engine.refuse = "the engine says no"
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 400
    engine.refuse, engine.fail_after = None, 1
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 500
    assert (adm.queued_requests, adm.queued_tokens) == (0, 0)


def test_a_stream_that_never_starts_still_leaves_the_queue():
    """The client is gone before the first byte: the SSE generator never runs, so only the
    middleware's close after the response can give the queue place back."""
    engine = FakeEngineClient()
    app = build_app(engine, engine.tokenizer, MODEL, None)
    adm = app.state.ctx.admission
    body = json.dumps({"prompt": "hi", "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": "/v1/completions",
             "raw_path": b"/v1/completions", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("t", 1), "server": ("t", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("client gone")

    async def run() -> None:
        with pytest.raises(OSError):
            await app(scope, receive, send)

    asyncio.run(run())
    assert engine.requests == []  # nothing reached the engine
    assert (adm.queued_requests, adm.queued_tokens) == (0, 0)


def test_openai_client_sees_queue_refusal_as_rate_limit_error():
    client, _, adm = make(RequestLimits(max_num_queued_requests=1))
    adm.queued_requests = 1  # someone else is waiting
    oai = openai.OpenAI(api_key="k", base_url="http://testserver/v1", http_client=client,
                        max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"


# ---- limits --------------------------------------------------------------------------------

def test_n_max_tokens_and_stop_limits_name_their_param():
    client, engine, _ = make(RequestLimits(max_n=3, max_tokens=10, max_stop_strings=2,
                                           max_stop_string_length=4))
    cases = [
        ("/v1/completions", {"prompt": "hi", "n": 4}, "n"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 11}, "max_tokens"),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 11},
         "max_completion_tokens"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c"]}, "stop"),
        ("/v1/chat/completions", {"messages": CHAT, "stop": "abcde"}, "stop"),
    ]
    for path, body, param in cases:
        assert_error(client.post(path, json=body), 400, param, None)
    assert engine.requests == []
    ok = client.post("/v1/completions", json={"prompt": "hi", "n": 3, "max_tokens": 10,
                                              "stop": ["abcd", "x"]})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 3


def test_max_n_above_the_old_fixed_cap():
    client, _, _ = make(RequestLimits(max_n=200))
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 150, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 150
    assert_error(make()[0].post("/v1/completions", json={"prompt": "hi", "n": 129}),
                 400, "n", None)


def test_prompt_bound_refuses_without_tokenizing():
    client, engine, adm = make(RequestLimits(max_prompt_tokens=10), max_model_len=64)
    adm.max_token_bytes = 2  # every token covers at most 2 bytes
    err = assert_error(client.post("/v1/completions", json={"prompt": "y" * 30}), 400,
                       "prompt", "prompt_too_long")
    assert "at least 15 tokens" in err["message"]
    big = [{"role": "user", "content": "z" * 200}]
    assert_error(client.post("/v1/chat/completions", json={"messages": big}), 400,
                 "messages", "prompt_too_long")
    adm.limits = RequestLimits()  # now only the context (64) bounds it: 100 >= 64
    err = assert_error(client.post("/v1/completions", json={"prompt": "y" * 200}), 400,
                       "prompt", "context_length_exceeded")
    assert "at least 100 tokens" in err["message"]
    assert engine.tokenizer.calls == []
    adm.limits = RequestLimits(max_prompt_tokens=10)
    # 12 characters pass the bound (>= 6 tokens) but are 13 tokens with BOS.
    err = assert_error(client.post("/v1/completions", json={"prompt": "w" * 12}), 400,
                       "prompt", "prompt_too_long")
    assert "has 13 tokens" in err["message"]
    r = client.post("/v1/completions", json={"prompt": [5] * 11})  # token ids: exact
    assert_error(r, 400, "prompt", "prompt_too_long")
    assert engine.requests == [] and adm.queued_requests == 0


def test_max_token_bytes_is_a_true_bound_for_a_real_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bound = max_token_bytes(tok)
    longest = max(len(tok.decode([i]).encode()) for i in range(len(tok)))
    assert bound is not None and bound >= longest
    for text in ["Hello there", "Unicode text: café, naïve, 東京 🙂" * 3, "\n\n  x" * 50]:
        assert len(tok.encode(text, add_special_tokens=False)) >= min_tokens(text, bound)


def test_body_too_large_is_413_by_length_or_while_reading():
    client, engine, _ = make(RequestLimits(max_request_body_bytes=200))
    body = json.dumps({"prompt": "q" * 300}).encode()
    r = client.post("/v1/completions", content=body,
                    headers={"content-type": "application/json"})
    err = assert_error(r, 413, None, "request_too_large")
    assert "200 bytes" in err["message"]
    chunked = client.post("/v1/completions", content=iter([body[:150], body[150:]]))
    assert "content-length" not in chunked.request.headers
    assert_error(chunked, 413, None, "request_too_large")
    ok = client.post("/v1/completions", content=iter([b'{"prompt": ', b'"hi"}']))
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "Hello"
    assert len(engine.requests) == 1
    text = client.get("/metrics").text
    assert metric(text, "conveyor:requests_rejected_total", reason="body_too_large") == 2


# ---- --request-timeout ---------------------------------------------------------------------

def test_timeout_non_stream_is_504_and_aborts_the_engine_request():
    client, engine, adm = make(RequestLimits(request_timeout=0.3), delay=0.1)
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50})
    err = assert_error(r, 504, None, "request_timeout", type="server_error")
    assert "0.3 s" in err["message"]
    (req,) = engine.requests
    asyncio.run(until(lambda: engine.aborted == [req.request_id]))
    assert engine.finished == [] and (adm.queued_requests, adm.queued_tokens) == (0, 0)
    text = client.get("/metrics").text
    assert metric(text, "conveyor:request_timeouts_total") == 1


def test_timeout_in_a_stream_ends_with_an_error_event_then_done():
    client, engine, adm = make(RequestLimits(request_timeout=0.3), delay=0.1)
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2][len("data: "):])["error"]
    assert (err["type"], err["code"]) == ("server_error", "request_timeout")
    content = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events[:-2]]
    assert 1 <= len(content) < 6  # the role chunk and some tokens, not all of "Hello"
    (req,) = engine.requests
    asyncio.run(until(lambda: engine.aborted == [req.request_id]))
    assert engine.finished == [] and adm.queued_requests == 0


def test_no_timeout_by_default():
    client, engine, _ = make(delay=0.02)
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5})
    assert r.status_code == 200 and engine.aborted == []


def test_limits_from_flags_map_zero_to_unbounded():
    from server.cli import parse_args

    args = parse_args(["serve", "--max-num-queued-requests", "0", "--request-timeout", "2.5",
                       "--max-n", "4"], {"CONVEYOR_MAX_QUEUED_TOKENS": "9000"})
    limits = RequestLimits.from_args(args)
    assert limits == RequestLimits(max_num_queued_requests=None, max_queued_tokens=9000,
                                   max_n=4, request_timeout=2.5)
    assert RequestLimits.from_args(parse_args(["serve"], {})) == RequestLimits()
