"""Per-API-key tenants: the keys file, token buckets on an injected clock, 429s and the
x-ratelimit-* headers on every OpenAI route's response."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from starlette.types import Receive, Scope, Send

from server.frontend.app import build_app
from server.frontend.tenants import (
    APIKeysError,
    KeySpec,
    TenantInfo,
    TenantMiddleware,
    Tenants,
    TokenBucket,
    format_duration,
    load_api_keys,
)
from tests.fake_engine import FakeEngineClient

ROOT = Path(__file__).resolve().parent.parent
MODEL = "fake-model"
KEY_A, KEY_B, ADMIN = "sk-team-a", "sk-team-b", "sk-admin"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(keys: dict[str, KeySpec], admin: str | None = None, **engine_kwargs):
    clock = Clock()
    engine = FakeEngineClient(**engine_kwargs)
    app = build_app(engine, engine.tokenizer, MODEL, admin, tenants=Tenants(keys, clock=clock))
    return TestClient(app, raise_server_exceptions=False), engine, clock


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def limits_of(r) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.startswith("x-ratelimit-")}


def test_format_duration_is_openais():
    cases = {0: "0s", 0.0004: "1ms", 0.12: "120ms", 0.999: "999ms", 1: "1s", 1.5: "1.5s",
             4.8: "4.8s", 59.25: "59.25s", 60: "1m0s", 360: "6m0s", 3661: "1h1m1s",
             7200.5: "2h0m0.5s"}
    assert {s: format_duration(s) for s in cases} == cases


def test_token_bucket_refills_continuously_and_admits_one_oversized_cost_when_full():
    clock = Clock()
    b = TokenBucket(60, clock)  # one a second
    assert b.take(50) == 0 and b.remaining() == 10
    assert b.take(20) == pytest.approx(10.0)  # 10 short: 10 s
    assert b.remaining() == 10  # a refused take takes nothing
    clock.t += 4.5
    assert b.remaining() == 14 and b.seconds_until_full() == pytest.approx(45.5)
    clock.t += 100
    assert b.remaining() == 60  # capped at a minute's worth
    assert b.take(150) == 0  # more than capacity: admitted from a full bucket...
    assert b.remaining() == 0 and b.seconds_until_full() == pytest.approx(150.0)
    assert b.take(1) == pytest.approx(91.0)  # ...and the debt is paid back first
    b.give_back(100)
    assert b.remaining() == 10


def test_keys_file_parses_and_the_example_loads(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  sk-a: {tenant: a, requests_per_minute: 6, weight: 2}\n"
                    "  sk-b: {tenant: b, tokens_per_minute: 100}\n")
    assert load_api_keys(path) == {"sk-a": KeySpec("a", 6, None, 2.0),
                                   "sk-b": KeySpec("b", None, 100, 1.0)}
    example = load_api_keys(ROOT / "configs" / "api-keys.example.yaml")
    assert example["sk-example-team-a"] == KeySpec("team-a", 60, 100000, 2.0)
    assert len(example) == 3


@pytest.mark.parametrize("entry, message", [
    ("{tenant: b, requests_per_minute: -1}", "requests_per_minute must be a positive integer"),
    ("{tenant: b, tokens_per_minute: lots}", "tokens_per_minute must be a positive integer"),
    ("{tenant: b, requests_per_minute: true}", "requests_per_minute must be a positive"),
    ("{tenant: b, weight: 0}", "weight must be a positive number"),
    ("{requests_per_minute: 5}", "tenant must be a non-empty string"),
    ("{tenant: b, rpm: 5}", "unknown field(s) rpm"),
    ("just-a-string", "expected a mapping"),
])
def test_bad_entries_name_the_entry(tmp_path, entry, message):
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  sk-good: {{tenant: a}}\n  sk-second-key: {entry}\n")
    with pytest.raises(APIKeysError) as info:
        load_api_keys(path)
    assert str(info.value).startswith(f"{path}: entry 2 (key 'sk-sec...')")
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["", "keys: []\n", "other: 1\n", "keys: {}\n", "keys: ["])
def test_bad_files_are_refused(tmp_path, text):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(APIKeysError, match=re.escape(str(path))):
        load_api_keys(path)


def test_server_refuses_a_bad_keys_file_at_start_up(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  sk-whoops-1: {tenant: a, weight: -2}\n")
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--model", str(tmp_path),
                          "--api-keys-file", str(path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2
    assert "entry 1 (key 'sk-who...'): weight must be a positive number" in out.stderr


def test_request_limit_429_with_headers_and_refill():
    client, engine, clock = make({KEY_A: KeySpec("a", requests_per_minute=2)})
    body = {"prompt": "hi", "max_tokens": 2}
    r = client.post("/v1/completions", json=body, headers=auth(KEY_A))
    assert r.status_code == 200
    # One of two taken; refilling one takes 30 s. No token limit: no -tokens headers.
    assert limits_of(r) == {"x-ratelimit-limit-requests": "2",
                            "x-ratelimit-remaining-requests": "1",
                            "x-ratelimit-reset-requests": "30s"}
    assert client.post("/v1/completions", json=body, headers=auth(KEY_A)).status_code == 200
    clock.t += 6
    r = client.post("/v1/completions", json=body, headers=auth(KEY_A))
    assert r.status_code == 429 and r.headers["retry-after"] == "24"
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("rate_limit_error",
                                                        "rate_limit_exceeded", None)
    assert limits_of(r)["x-ratelimit-remaining-requests"] == "0"
    assert limits_of(r)["x-ratelimit-reset-requests"] == "54s"
    assert len(engine.requests) == 2
    clock.t += 25
    assert client.post("/v1/completions", json=body, headers=auth(KEY_A)).status_code == 200
    text = client.get("/metrics").text
    assert (f'conveyor:requests_rejected_total{{model_name="{MODEL}",reason="tenant_requests"}}'
            " 1.0") in text


def test_token_reservation_refunds_what_was_not_generated():
    client, engine, clock = make({KEY_A: KeySpec("a", tokens_per_minute=100)})
    # "hi" is 3 prompt tokens; the replies "Hello" and "Hello!" 11: 14 used of 3 + 2 * 20.
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 20, "n": 2},
                    headers=auth(KEY_A))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 14
    assert limits_of(r) == {"x-ratelimit-limit-tokens": "100",
                            "x-ratelimit-remaining-tokens": "86",
                            "x-ratelimit-reset-tokens": "8.4s"}
    # 3 + 2 * 50 = 103 is over a minute's worth: it waits for a full bucket, 8.4 s away.
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 50, "n": 2},
                    headers=auth(KEY_A))
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert "requested 103" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "9"
    assert limits_of(r)["x-ratelimit-remaining-tokens"] == "86"
    assert len(engine.requests) == 1
    assert client.app.state.ctx.admission.queued_requests == 0


def test_streams_errors_and_other_routes_carry_headers_admin_key_does_not():
    keys = {KEY_A: KeySpec("a", 10, 1000), KEY_B: KeySpec("b", 5)}
    client, _, _ = make(keys, admin=ADMIN)
    with client.stream("POST", "/v1/chat/completions", headers=auth(KEY_A), json={
            "messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        assert r.status_code == 200
        assert limits_of(r)["x-ratelimit-remaining-requests"] == "9"
        assert r.read().endswith(b"data: [DONE]\n\n")
    r = client.post("/openai/v1/completions", json={"prompt": "hi", "top_p": 9},
                    headers=auth(KEY_A))
    assert r.status_code == 400 and limits_of(r)["x-ratelimit-remaining-requests"] == "8"
    r = client.get("/v1/models", headers=auth(KEY_B))  # headers, but no request taken
    assert r.status_code == 200 and limits_of(r)["x-ratelimit-remaining-requests"] == "5"
    r = client.post("/v1/completions", json={"prompt": "hi"}, headers=auth(ADMIN))
    assert r.status_code == 200 and limits_of(r) == {}
    r = client.post("/tokenize", json={"prompt": "hi"}, headers=auth(KEY_B))
    assert r.status_code == 200 and limits_of(r) == {}  # not an OpenAI route
    assert client.get("/health").status_code == 200
    for headers in ({}, auth("sk-nope"), {"Authorization": f"Basic {KEY_A}"}):
        r = client.post("/v1/completions", json={"prompt": "hi"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert limits_of(r) == {}


def test_without_admin_key_only_file_keys_authenticate():
    client, _, _ = make({KEY_A: KeySpec("a")})
    assert client.post("/v1/completions", json={"prompt": "hi"},
                       headers=auth(KEY_A)).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "hi"},
                       headers=auth("")).status_code == 401


def test_tenant_is_left_on_the_request_state():
    seen = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"].get("tenant"))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = TenantMiddleware(app, Tenants({KEY_A: KeySpec("team-a", weight=2.5)}), ADMIN)
    client = TestClient(mw)
    assert client.get("/v1/models", headers=auth(KEY_A)).status_code == 204
    assert client.get("/v1/models", headers=auth(ADMIN)).status_code == 204
    assert seen == [TenantInfo("team-a", 2.5), None]


def test_the_engine_gets_the_keys_tenant_and_weight():
    client, engine, _ = make({KEY_A: KeySpec("team-a", weight=3)}, admin=ADMIN)
    for key in (KEY_A, ADMIN):
        r = client.post("/v1/completions", json={"prompt": "hi"}, headers=auth(key))
        assert r.status_code == 200
    assert [(s.tenant, s.tenant_weight) for s in engine.requests] == [("team-a", 3.0),
                                                                      (None, 1.0)]


def test_openai_client_sees_rate_limit_error():
    client, _, _ = make({KEY_A: KeySpec("a", requests_per_minute=1)})
    oai = openai.OpenAI(api_key=KEY_A, base_url="http://testserver/v1", http_client=client,
                        max_retries=0)
    assert oai.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices
    with pytest.raises(openai.RateLimitError) as info:
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=1)
    assert info.value.response.headers["retry-after"] == "60"
    assert info.value.response.headers["x-ratelimit-limit-requests"] == "1"
