"""A real `conveyor serve` process, driven by the official openai client and raw httpx."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from server import LLM, SamplingParams
from tests.server_process import ServerProcess

PROMPTS = ["Hello there", "The quick brown fox", "A paged KV cache", "Once upon a time"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _stats(server) -> dict:
    return httpx.get(server.base_url + "/internal/stats", timeout=10).json()


def test_greedy_text_equals_offline_llm(client, model_dir):
    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=256)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    offline = [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    resp = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=16,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(resp.choices, key=lambda c: c.index)] == offline
    assert all(c.finish_reason == "length" for c in resp.choices)
    tok = llm.get_tokenizer()
    assert resp.usage.prompt_tokens == sum(len(tok(p).input_ids) for p in PROMPTS)
    assert resp.usage.completion_tokens == 16 * len(PROMPTS)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_stream_joined_equals_non_stream(client):
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=20, temperature=0.8,
              seed=42, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True,
                                            stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])


def test_chat_stream_and_n(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, n=3,
                                          temperature=1.0, seed=1)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.message.role == "assistant" for c in resp.choices)
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8,
                                           temperature=0)
    assert text == plain.choices[0].message.content


def test_logprobs_echo_and_stop(client):
    resp = client.completions.create(model="tiny", prompt="Hello there", max_tokens=5,
                                     temperature=0, logprobs=2, echo=True,
                                     extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.text.startswith("Hello there")
    assert len(choice.logprobs.tokens) == len(choice.logprobs.token_logprobs)
    assert choice.logprobs.token_logprobs[0] is None  # the first prompt token
    full = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[4:7]
    cut = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]


def test_errors_are_openai_shaped(server):
    url = server.base_url
    r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 10_000})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "top_p": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"


def test_64_concurrent_streams_complete(server, client):
    aclient = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    expected = client.completions.create(model="tiny", prompt="Count with me", max_tokens=12,
                                         temperature=0, extra_body={"ignore_eos": True})

    async def one() -> str:
        stream = await aclient.completions.create(model="tiny", prompt="Count with me",
                                                  max_tokens=12, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run() -> list[str]:
        try:
            return await asyncio.gather(*[one() for _ in range(64)])
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    assert texts == [expected.choices[0].text] * 64


def test_disconnect_aborts_and_frees_blocks(server):
    async def start_and_drop() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as ac:
            async def one(i: int) -> None:
                body = {"prompt": f"Drop me {i}", "max_tokens": 400, "stream": True,
                        "ignore_eos": True}
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        break  # first chunk seen: hang up
            await asyncio.gather(*[one(i) for i in range(8)])

    asyncio.run(start_and_drop())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = _stats(server)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_cache_usage"] == 0.0


def test_engine_death_errors_in_flight_and_exits_nonzero(model_dir):
    """Health 503 on a dead engine is covered in test_http_unit; here the real process."""
    server = ServerProcess(model_dir, "--num-kv-blocks", "64")
    try:
        pid = _stats(server)["engine_pid"]
        body = {"prompt": "Keep going", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                          timeout=30) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 1:
                    os.kill(pid, signal.SIGKILL)
        assert events[-1] == "data: [DONE]"
        assert '"error"' in events[-2] and "engine" in events[-2]
        deadline = time.monotonic() + 20
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.proc.returncode not in (None, 0)
    finally:
        server.stop()
