"""The HTTP layer against a scripted engine: every bad request is an OpenAI-shaped error
with the right status, and nothing else gets through."""

from __future__ import annotations

import pytest

from tests.fake_engine import VOCAB_SIZE
from tests.openai_errors import assert_error
from tests.test_http_unit import CHAT, make


def test_integral_floats_are_integers():
    # JSON Schema (our OpenAPI schema) counts 3.0 as an integer; strings stay refused.
    client, engine = make()
    r = client.post("/v1/completions", json={"prompt": [5.0, 6], "max_tokens": 3.0, "n": 1.0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


# ---- errors ------------------------------------------------------------------------------

LONG = "x" * 70  # longer than the fake's 64-token context

ERROR_CASES = [
    # (path, body, status, param, code)
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": [1, 2.5]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", None),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", None),
    ("/v1/completions", {"prompt": "hi", "n": 129}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs", None),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop", None),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [VOCAB_SIZE]}, 400,
     "stop_token_ids", None),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, 400,
     "min_tokens", None),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"}}, 400,
     "response_format", None),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [[]]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": 5}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [1, VOCAB_SIZE]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [-1]}, 400, "prompt", None),
    ("/v1/completions", {}, 400, "prompt", None),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 62}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400,
     "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", None),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400,
     "max_completion_tokens", None),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 64}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "nope"}, 404, "model",
     "model_not_found"),
    ("/openai/v1/completions", {"prompt": "hi", "top_p": 2}, 400, "top_p", None),
]


@pytest.mark.parametrize("path, body, status, param, code", ERROR_CASES)
def test_bad_requests_are_openai_errors(path, body, status, param, code):
    client, engine = make()
    assert_error(client.post(path, json=body), status, param, code)
    assert engine.requests == []


def test_context_length_message_has_the_numbers():
    client, _ = make()
    err = assert_error(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 62}),
                       400, "max_tokens", "context_length_exceeded")
    assert "64" in err["message"] and "65" in err["message"] and "3" in err["message"]


@pytest.mark.parametrize("content, message_part", [
    (b'{"prompt": "hi",', "JSON"),
    (b"", "JSON"),
    (b'["prompt"]', "object"),
    (b'{"prompt": "\xff\xfe"}', "UTF-8"),
])
def test_malformed_bodies(content, message_part):
    client, _ = make()
    r = client.post("/v1/completions", content=content,
                    headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and message_part in err["message"]
    assert err["code"] is None or isinstance(err["code"], str)


def test_unknown_route_and_wrong_method():
    client, _ = make()
    assert_error(client.get("/v1/nothing"), 404, None)
    assert_error(client.post("/nothing/at/all", json={}), 404, None)
    r = client.get("/v1/completions")
    assert_error(r, 405, None)
    assert r.headers["allow"] == "POST"


def test_engine_dead_is_503_and_failure_is_500_without_trace():
    client, engine = make()
    engine.dead = True
    assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 503, None,
                 "engine_dead", type="server_error")
    client, engine = make(fail_after=1)
    r = client.post("/v1/completions", json={"prompt": "hi"})
    err = assert_error(r, 500, None, type="server_error")
    assert "Traceback" not in r.text and "scripted" not in err["message"]


def test_engine_refusal_is_a_400():
    client, _ = make(refuse="prompt needs more KV blocks than the cache has")
    err = assert_error(client.post("/v1/completions", json={"prompt": "hi"}), 400, None)
    assert "KV blocks" in err["message"]


def test_not_ready_engine_refuses_generation():
    client, _ = make(ready=False)
    assert_error(client.post("/v1/chat/completions", json={"messages": CHAT}), 503, None,
                 "engine_not_ready", type="server_error")
