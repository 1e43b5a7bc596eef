"""SSE streaming shapes, errors inside a stream, and client disconnects (scripted engine)."""

from __future__ import annotations

import asyncio
import json

from fastapi.testclient import TestClient

from server.frontend.app import build_app
from tests.fake_engine import FakeEngineClient

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "hi"}]


def make(**engine_kwargs) -> tuple[TestClient, FakeEngineClient]:
    engine = FakeEngineClient(**engine_kwargs)
    app = build_app(engine, engine.tokenizer, MODEL, None)
    return TestClient(app, raise_server_exceptions=False), engine


def stream(client: TestClient, path: str, body: dict) -> list[dict]:
    """POSTs with stream=true; returns the JSON events and checks the SSE framing."""
    r = client.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for c in chunks:
        for choice in c["choices"]:
            out.setdefault(choice["index"], []).append(choice)
    return out


def test_completion_stream_chunks():
    client, _ = make()
    chunks = stream(client, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    assert all("usage" not in c for c in chunks)  # only with stream_options.include_usage
    choices = by_choice(chunks)[0]
    assert [c["text"] for c in choices] == ["H", "e", "l"]
    assert [c["finish_reason"] for c in choices] == [None, None, "length"]


def test_completion_stream_usage_chunk_and_multi_prompt_interleaving():
    client, engine = make()
    chunks = stream(client, "/v1/completions", {
        "prompt": ["a", "b"], "n": 2, "stream_options": {"include_usage": True}})
    assert len(engine.requests) == 2
    *body, last = chunks
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": 4, "completion_tokens": 2 * (5 + 6), "total_tokens": 26}
    assert all(c["usage"] is None for c in body)
    assert all(len(c["choices"]) == 1 for c in body)
    choices = by_choice(body)
    assert sorted(choices) == [0, 1, 2, 3]
    for idx, seq in choices.items():
        assert "".join(c["text"] for c in seq) == "Hello" + "!" * (idx % 2)
        # finish_reason only on the last chunk of each choice
        assert [c["finish_reason"] for c in seq] == [None] * (len(seq) - 1) + ["stop"]
    order = [c["choices"][0]["index"] for c in body]
    assert order != sorted(order)  # the choices' streams interleave


def test_completion_stream_echo_and_logprobs():
    client, _ = make()
    chunks = stream(client, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "echo": True,
                                                 "logprobs": 1})
    first, second = by_choice(chunks)[0]
    assert first["text"] == "hiH"
    assert first["logprobs"]["tokens"] == ["<s>", "h", "i", "H"]
    assert first["logprobs"]["token_logprobs"][0] is None
    assert second["text"] == "e"
    # Offsets continue across chunks.
    assert second["logprobs"]["text_offset"] == [first["logprobs"]["text_offset"][-1] + 1]
    assert second["logprobs"]["top_logprobs"] == [{"e": -0.5, "f": -1.5}]


def test_chat_stream_role_first_finish_last_and_usage():
    client, _ = make()
    chunks = stream(client, "/v1/chat/completions", {
        "messages": CHAT, "n": 2, "max_tokens": 6, "logprobs": True,
        "stream_options": {"include_usage": True}})
    *body, last = chunks
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5 + 6
    for idx, seq in by_choice(body).items():
        assert seq[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in seq[1:])
        assert "".join(c["delta"].get("content", "") for c in seq) == "Hello" + "!" * idx
        assert [c["finish_reason"] for c in seq] == [None] * (len(seq) - 1) + [
            "stop" if idx == 0 else "length"]
        assert seq[1]["logprobs"]["content"][0]["token"] == "H"
        assert seq[1]["logprobs"]["content"][0]["top_logprobs"] == []


def test_error_after_stream_started_is_an_sse_event():
    client, _ = make(fail_after=2)
    chunks = stream(client, "/v1/chat/completions", {"messages": CHAT})
    *normal, err = chunks
    assert [c["choices"][0]["delta"] for c in normal] == [
        {"role": "assistant", "content": ""}, {"content": "H"}, {"content": "e"}]
    assert set(err) == {"error"}
    assert err["error"]["type"] == "server_error" and err["error"]["code"] is None
    assert "scripted" not in err["error"]["message"]


def test_stream_validation_errors_are_plain_json_before_the_stream():
    client, _ = make()
    r = client.post("/v1/completions", json={"prompt": "hi", "stream": True, "top_p": 9})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"


def test_official_openai_client_parses_responses_and_streams():
    import httpx
    import openai

    async def run() -> None:
        engine = FakeEngineClient()
        app = build_app(engine, engine.tokenizer, MODEL, "key")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app),
                                     base_url="http://test") as http:
            client = openai.AsyncOpenAI(api_key="key", base_url="http://test/v1",
                                        http_client=http, max_retries=0)
            r = await client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                                logprobs=1)
            assert r.choices[0].text == "He" and r.usage.total_tokens == 5
            assert r.choices[0].logprobs.tokens == ["H", "e"]
            s = await client.chat.completions.create(
                model=MODEL, messages=CHAT, n=2, stream=True,
                stream_options={"include_usage": True})
            texts = ["", ""]
            async for chunk in s:
                for c in chunk.choices:
                    texts[c.index] += c.delta.content or ""
            assert texts == ["Hello", "Hello!"] and chunk.usage.completion_tokens == 11
            try:
                await client.chat.completions.create(model="other", messages=CHAT)
                raise AssertionError("expected a 404")
            except openai.NotFoundError as exc:
                assert exc.code == "model_not_found"

    asyncio.run(run())


# ---- client disconnect --------------------------------------------------------------------

async def _call_then_disconnect(app, engine: FakeEngineClient, path: str, body: dict, *,
                                after_first_chunk: bool,
                                after_s: float = 0.0) -> tuple[list[bytes], list[str]]:
    """Drives the ASGI app directly, disconnecting after the first body chunk or a delay.

    Returns the body chunks and the engine's aborts shortly after the app returned: taken
    inside the loop, because asyncio.run's shutdown would cancel leftover tasks anyway.
    """
    gone = asyncio.Event()
    sent_request = False
    chunks: list[bytes] = []

    async def receive() -> dict:
        nonlocal sent_request
        if not sent_request:
            sent_request = True
            return {"type": "http.request", "body": json.dumps(body).encode(),
                    "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            chunks.append(message["body"])
            if after_first_chunk:
                gone.set()

    if not after_first_chunk:
        asyncio.get_running_loop().call_later(after_s, gone.set)
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
             "client": ("127.0.0.1", 1234), "server": ("test", 80)}
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    await asyncio.sleep(0.05)  # let the cancelled pump tasks unwind
    return chunks, list(engine.aborted)


def _long_engine() -> FakeEngineClient:
    return FakeEngineClient(max_model_len=1024, delay=0.01,
                            reply=lambda ids, j: "word " * 100)


def test_stream_disconnect_aborts_the_engine_request():
    for path, body in (("/v1/completions", {"prompt": "hi", "stream": True}),
                       ("/v1/chat/completions", {"messages": CHAT, "stream": True}),
                       ("/v1/completions", {"prompt": ["a", "b"], "stream": True})):
        engine = _long_engine()
        app = build_app(engine, engine.tokenizer, MODEL, None)
        chunks, aborted = asyncio.run(
            _call_then_disconnect(app, engine, path, body, after_first_chunk=True))
        assert chunks and b"[DONE]" not in b"".join(chunks)
        assert sorted(aborted) == sorted(r.request_id for r in engine.requests)
        assert aborted and engine.finished == []


def test_non_stream_disconnect_aborts_the_engine_request():
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": CHAT, "n": 2})):
        engine = _long_engine()
        app = build_app(engine, engine.tokenizer, MODEL, None)
        app.state.ctx.disconnect_poll_s = 0.01
        chunks, aborted = asyncio.run(_call_then_disconnect(
            app, engine, path, body, after_first_chunk=False, after_s=0.1))
        assert aborted and [r.request_id for r in engine.requests] == aborted
        assert engine.finished == []
        assert json.loads(b"".join(chunks))["error"]["code"] == "client_disconnected"
