"""The HTTP layer against a scripted engine: shapes and parameters.

Error cases are in test_http_errors.py, streaming and client disconnects in
test_http_stream_unit.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.frontend.app import build_app
from tests.fake_engine import BOS, VOCAB_SIZE, CharTokenizer, FakeEngineClient, tok_ids
from tests.openai_errors import assert_error

MODEL = "fake-model"


def make(api_key: str | None = None, **engine_kwargs) -> tuple[TestClient, FakeEngineClient]:
    engine = FakeEngineClient(**engine_kwargs)
    app = build_app(engine, engine.tokenizer, MODEL, api_key)
    return TestClient(app, raise_server_exceptions=False), engine


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
