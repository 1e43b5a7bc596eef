"""The HTTP layer against a scripted engine: shapes, parameters and every error case.

Streaming and client disconnects are in test_http_stream_unit.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.frontend.app import build_app
from tests.fake_engine import BOS, VOCAB_SIZE, CharTokenizer, FakeEngineClient, tok_ids

MODEL = "fake-model"


def make(api_key: str | None = None, **engine_kwargs) -> tuple[TestClient, FakeEngineClient]:
    engine = FakeEngineClient(**engine_kwargs)
    app = build_app(engine, engine.tokenizer, MODEL, api_key)
    return TestClient(app, raise_server_exceptions=False), engine


def assert_error(r, status: int, param: str | None, code: str | None = None,
                 type: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == (type, param, code), err
    assert isinstance(err["message"], str) and err["message"]
    return err


CHAT = [{"role": "user", "content": "hi"}]


# ---- completions ---------------------------------------------------------------------------

def test_completion_response_shape_and_default_max_tokens():
    client, engine = make()
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "text": "Hello", "logprobs": None,
                                "finish_reason": "stop", "stop_reason": None}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    (req,) = engine.requests
    assert req.prompt == "hi" and req.prompt_token_ids == [BOS, *tok_ids("hi")]
    assert req.params.max_tokens == 64 - 3  # the rest of the context, like vLLM


def test_sampling_fields_reach_sampling_params():
    client, engine = make()
    r = client.post("/v1/completions", json={
        "prompt": "hi", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
        "min_p": 0.1, "seed": 3, "min_tokens": 1, "stop": "x", "stop_token_ids": [5],
        "ignore_eos": True, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "repetition_penalty": 1.1, "logit_bias": {"12": 5.0}, "skip_special_tokens": False,
        "include_stop_str_in_output": True, "user": "u1"})
    assert r.status_code == 200, r.text
    p = engine.requests[0].params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == \
        (2, 0.5, 0.9, 7, 0.1, 3)
    assert (p.min_tokens, p.stop_strings, p.stop_token_ids, p.ignore_eos) == \
        (1, ["x"], [5], True)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert p.logit_bias == {12: 5.0}
    assert not p.skip_special_tokens and p.include_stop_str_in_output
    assert r.json()["choices"][0] == {"index": 0, "text": "He", "logprobs": None,
                                      "finish_reason": "length", "stop_reason": None}


def test_unknown_fields_are_ignored():
    client, _ = make()
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                             "frobnicate": {"x": 1}, "suffix": None})
    assert r.status_code == 200, r.text


def test_n_choices_are_one_engine_request():
    client, engine = make()
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 3, "max_tokens": 10})
    assert len(engine.requests) == 1 and engine.requests[0].params.n == 3
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == ["Hello", "Hello!", "Hello!!"]
    assert r.json()["usage"]["completion_tokens"] == 5 + 6 + 7


@pytest.mark.parametrize("prompt, expected_ids", [
    (["ab", "c"], [[BOS, *tok_ids("ab")], [BOS, *tok_ids("c")]]),
    ([[10, 11], [12]], [[10, 11], [12]]),
    ([10, 11, 12], [[10, 11, 12]]),
])
def test_prompt_forms_and_multi_prompt_indexes(prompt, expected_ids):
    client, engine = make()
    r = client.post("/v1/completions", json={"prompt": prompt, "n": 2, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert [req.prompt_token_ids for req in engine.requests] == expected_ids
    assert len({req.request_id for req in engine.requests}) == len(expected_ids)
    choices = r.json()["choices"]
    # Choice index = prompt_index * n + sequence index, as in OpenAI's API.
    assert [c["index"] for c in choices] == list(range(2 * len(expected_ids)))
    assert all(c["text"] == "Hel" for c in choices)
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == sum(len(ids) for ids in expected_ids)
    assert usage["completion_tokens"] == 3 * 2 * len(expected_ids)


def test_echo_prepends_prompt_text_for_text_and_token_prompts():
    client, _ = make()
    r = client.post("/v1/completions", json={"prompt": ["ab", tok_ids("cd")], "echo": True,
                                             "max_tokens": 2})
    assert_error(r, 400, "prompt")  # text and token prompts cannot be mixed
    r = client.post("/v1/completions", json={"prompt": "ab", "echo": True, "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "abHe"
    r = client.post("/v1/completions", json={"prompt": tok_ids("cd"), "echo": True,
                                             "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "cdHe"


def test_completion_logprobs_shape():
    client, engine = make()
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 2})
    assert engine.requests[0].params.logprobs == 2
    assert engine.requests[0].params.prompt_logprobs is None
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"]
    assert lp["token_logprobs"] == [-0.5, -0.5, -0.5]
    assert lp["text_offset"] == [0, 1, 2]
    assert lp["top_logprobs"][0] == {"H": -0.5, "I": -1.5, "J": -2.5}


def test_echo_with_logprobs_includes_prompt_logprobs():
    client, engine = make()
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "logprobs": 0,
                                             "echo": True})
    assert engine.requests[0].params.prompt_logprobs == 0
    lp = r.json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["<s>", "h", "i", "H", "e"]
    assert lp["token_logprobs"] == [None, -2.0, -2.0, -0.5, -0.5]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"h": -2.0}
    assert lp["text_offset"] == [0, 3, 4, 5, 6]


# ---- chat ------------------------------------------------------------------------------------

def test_chat_response_shape_and_template_tokenization():
    client, engine = make(max_model_len=128)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hell"},
                                "logprobs": None, "finish_reason": "length",
                                "stop_reason": None}]
    rendered = "<s>[system]be brief\n[user]a\nb\n[assistant]ok\n[user]hi\n[assistant]"
    req = engine.requests[0]
    assert req.prompt == rendered
    # The template wrote <s>; encoding must not add a second one.
    assert req.prompt_token_ids == CharTokenizer().encode(rendered, add_special_tokens=False)
    assert req.prompt_token_ids.count(BOS) == 1
    assert body["usage"]["prompt_tokens"] == len(req.prompt_token_ids)


def test_chat_max_completion_tokens_wins_over_max_tokens():
    client, engine = make()
    client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 9,
                                              "max_completion_tokens": 2})
    assert engine.requests[0].params.max_tokens == 2


def test_chat_logprobs_shape():
    client, engine = make()
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2,
                                                  "logprobs": True, "top_logprobs": 2})
    assert engine.requests[0].params.logprobs == 2
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "H", "logprob": -0.5, "bytes": [72], "top_logprobs": [
        {"token": "H", "logprob": -0.5, "bytes": [72]},
        {"token": "I", "logprob": -1.5, "bytes": [73]}]}
    assert [c["token"] for c in content] == ["H", "e"]
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1,
                                                  "logprobs": True})
    assert r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []


def test_chat_with_a_real_hf_tokenizer_template(tokenizer_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
                        "{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}assistant:{% endif %}")
    engine = FakeEngineClient()
    client = TestClient(build_app(engine, hf, MODEL, None))
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
    assert r.status_code == 200, r.text
    assert engine.requests[0].prompt == "<s>user: hi\nassistant:"
    assert engine.requests[0].prompt_token_ids.count(hf.bos_token_id) == 1
    hf.chat_template = None
    r = client.post("/v1/chat/completions", json={"messages": CHAT})
    assert_error(r, 400, "messages", "chat_template_missing")


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


# ---- models, tokenize, health, KServe, auth --------------------------------------------

def test_models_list_and_retrieve_under_both_prefixes():
    client, _ = make()
    for prefix in ("/v1", "/openai/v1"):
        data = client.get(f"{prefix}/models").json()
        assert data["object"] == "list"
        assert [(m["id"], m["object"], m["max_model_len"]) for m in data["data"]] == \
            [(MODEL, "model", 64)]
        assert client.get(f"{prefix}/models/{MODEL}").json()["id"] == MODEL
        assert_error(client.get(f"{prefix}/models/other"), 404, "model", "model_not_found")
    r = client.post("/openai/v1/chat/completions", json={"messages": CHAT, "max_tokens": 1})
    assert r.json()["choices"][0]["message"]["content"] == "H"


def test_tokenize_and_detokenize():
    client, _ = make()
    r = client.post("/tokenize", json={"prompt": "hi"})
    assert r.json() == {"count": 3, "max_model_len": 64, "tokens": [BOS, *tok_ids("hi")]}
    r = client.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False})
    assert r.json()["tokens"] == tok_ids("hi")
    r = client.post("/tokenize", json={"messages": CHAT})
    assert r.json()["tokens"] == CharTokenizer().encode("<s>[user]hi\n[assistant]", False)
    assert_error(client.post("/tokenize", json={}), 400, "prompt")
    assert_error(client.post("/tokenize", json={"prompt": "a", "messages": CHAT}), 400,
                 "prompt")
    assert client.post("/detokenize", json={"tokens": tok_ids("hey")}).json() == \
        {"prompt": "hey"}
    assert_error(client.post("/detokenize", json={"tokens": [1, VOCAB_SIZE]}), 400, "tokens")
    assert_error(client.post("/detokenize", json={"tokens": ["a"]}), 400, "tokens")
    assert_error(client.post("/detokenize", json={"tokens": [5], "model": "x"}), 404, "model",
                 "model_not_found")


def test_health_and_version():
    client, engine = make(ready=False)
    assert client.get("/health").status_code == 503
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    engine.ready = True
    assert client.get("/health").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{MODEL}/ready").status_code == 200
    assert_error(client.get("/v2/models/other/ready"), 404, "model", "model_not_found")
    engine.dead = True
    assert_error(client.get("/health"), 503, None, "engine_dead", type="server_error")
    assert client.get("/v2/health/live").status_code == 200
    assert isinstance(client.get("/version").json()["version"], str)


def test_api_key():
    client, _ = make(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for method, path in (("post", "/v1/completions"), ("get", "/v1/models"),
                             ("post", "/tokenize"), ("get", f"/v2/models/{MODEL}/ready"),
                             ("get", "/openai/v1/models"), ("get", "/v1/nothing")):
            r = getattr(client, method)(path, headers=headers)
            assert_error(r, 401, None, "invalid_api_key")
    for path in ("/health", "/version", "/v2/health/live", "/v2/health/ready"):
        assert client.get(path).status_code == 200
    ok = {"Authorization": "Bearer s3cret"}
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code \
        == 200
    r = client.post("/v1/completions", headers=ok, json={"prompt": "hi", "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == "H"
