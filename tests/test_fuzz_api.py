"""Schemathesis over the server's own OpenAPI schema: every route, valid and invalid inputs.

Whatever is sent, the answer is never a 5xx, and every 4xx body (and every error event in
a stream) is OpenAI-shaped. Most examples go to the app in process over
tests/fake_engine.py's scripted engine (parsing, validation, serving code); a few go to a
real `conveyor serve` on a tiny model. Valid examples come from a copy of the schema
narrowed to in-range values, so that they reach generation. Examples are derandomized, so
CI is reproducible.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation.modes import GenerationMode

from server.frontend.app import build_app
from tests.fake_engine import CharTokenizer, FakeEngineClient
from tests.openai_errors import assert_openai_error
from tests.server_process import running_server

MODEL = "fake-model"
FUZZ_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))


def _app():
    return build_app(FakeEngineClient(), CharTokenizer(), MODEL, None)


def check_response(status: int, content_type: str, text: str) -> None:
    assert status < 500, f"{status}: {text[:500]}"
    if status >= 400:
        assert content_type.startswith("application/json"), content_type
        assert_openai_error(json.loads(text))
    elif content_type.startswith("text/event-stream"):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-300:]
        for event in events[:-1]:
            payload = json.loads(event)
            if "error" in payload:
                assert_openai_error(payload)
                assert payload["error"]["type"] != "server_error", payload


def _call_and_check(case, **call_kwargs) -> int:
    """Send one generated case and check the response; returns its status."""
    response = case.call(**call_kwargs)
    # schemathesis' Response maps each header name to a list of values.
    content_type = (response.headers.get("content-type") or [""])[0]
    try:
        check_response(response.status_code, content_type, response.text)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nrequest: {case.as_curl_command()}") from exc
    return response.status_code


def _int(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _num(lo: float, hi: float, *, open_low: bool = False) -> dict:
    low = {"exclusiveMinimum": lo} if open_low else {"minimum": lo}
    return {"type": "number", **low, "maximum": hi}


_IDS = {"type": "array", "items": _int(3, 299), "minItems": 1, "maxItems": 8}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 16}
# Valid mode draws from these instead of the bare types, so that most examples get past
# the range checks and reach generation (streaming, n > 1, logprobs, stop strings...).
NARROW = {
    "model": {"anyOf": [{"enum": [MODEL]}, {"type": "null"}]},
    "n": _int(1, 3), "max_tokens": _int(1, 8), "max_completion_tokens": _int(1, 8),
    "temperature": _num(0, 2), "top_p": _num(0, 1, open_low=True), "top_k": _int(-1, 20),
    "min_p": _num(0, 1), "seed": _int(-(2**63), 2**64 - 1), "min_tokens": _int(0, 1),
    "presence_penalty": _num(-2, 2), "frequency_penalty": _num(-2, 2),
    "repetition_penalty": _num(0, 2, open_low=True), "top_logprobs": _int(0, 5),
    "stop_token_ids": {**_IDS, "minItems": 0},
    "stop": {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "maxItems": 3}]},
    "logit_bias": {"type": "object", "propertyNames": {"pattern": "^[1-9][0-9]{0,1}$"},
                   "additionalProperties": _num(-100, 100), "maxProperties": 3},
    "prompt": {"anyOf": [_TEXT, _IDS, {"type": "array", "items": _TEXT, "minItems": 1,
                                       "maxItems": 3}]},
    "messages": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]},
                       "content": _TEXT}}},
    "tokens": _IDS,
}


def _narrowed(spec: dict) -> dict:
    spec = json.loads(json.dumps(spec))
    for item in spec["paths"].values():
        for op in item.values():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            props = body["schema"]["properties"]
            for name, narrow in NARROW.items():
                # Chat's logprobs is a bool, completions' an int: only the int is narrowed.
                if name in props:
                    props[name] = narrow
            if "integer" in json.dumps(props.get("logprobs", {})):
                props["logprobs"] = _int(0, 5)
    return spec


@pytest.fixture(scope="module")
def api_schemas():
    """The app's own schema (for invalid examples) and a narrowed one (for valid ones)."""
    app = _app()
    raw = _whole_streams(schemathesis.openapi.from_asgi("/openapi.json", app))
    narrow = _whole_streams(schemathesis.openapi.from_dict(
        _narrowed(TestClient(app).get("/openapi.json").json())))
    narrow.app = app
    return {GenerationMode.NEGATIVE: raw, GenerationMode.POSITIVE: narrow}


def _whole_streams(schema):
    # schemathesis stops reading an event stream after 20 events; the [DONE] check needs all.
    schema.config.max_stream_events = 100_000
    return schema


# One hypothesis run per operation (schemathesis' pytest fixture plugin does not work with
# pytest 9), so every route gets its share of examples whatever the schema grows into.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
def test_no_5xx_and_openai_shaped_errors(api_schemas, mode: GenerationMode) -> None:
    operations = [result.ok() for result in api_schemas[mode].get_all_operations()]
    assert len(operations) >= 17  # every route of the app, /v1 and /openai/v1 included
    statuses: list[int] = []
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @FUZZ_SETTINGS
        def fuzz(case) -> None:
            statuses.append(_call_and_check(case))

        try:
            fuzz()
        except Unsatisfiable:
            # Nothing to make invalid: a GET without body (any string is a valid path part).
            assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET", \
                operation.label
        except AssertionError as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc
    ok = sum(1 for code in statuses if code < 300)
    if mode == GenerationMode.POSITIVE:
        # The narrowed schema must really reach generation, not only the validators.
        assert ok >= 40, (ok, len(statuses))
    else:
        assert ok == 0 and statuses and all(400 <= code < 500 for code in statuses)


@pytest.fixture(scope="module")
def real_server(tiny_model_factory):
    with running_server(tiny_model_factory("llama"), "--num-kv-blocks", "128",
                        "--max-model-len", "128", "--served-model-name", MODEL) as server:
        yield server


def test_post_routes_on_a_real_engine(real_server) -> None:
    """Fewer examples, through a real `conveyor serve` with a tiny model's engine (its
    own schema, sent over HTTP: no app is attached, so nothing runs in process)."""
    spec = httpx.get(real_server.base_url + "/openapi.json", timeout=10).json()
    narrow = _whole_streams(schemathesis.openapi.from_dict(_narrowed(spec)))
    posts = [r.ok() for r in narrow.get_all_operations() if r.ok().method.upper() == "POST"]
    assert len(posts) == 6
    statuses: list[int] = []
    for operation in posts:
        @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
        @settings(FUZZ_SETTINGS, max_examples=6)
        def fuzz(case) -> None:
            statuses.append(_call_and_check(case, base_url=real_server.base_url, timeout=60))

        try:
            fuzz()
        except AssertionError as exc:
            raise AssertionError(f"{operation.label}: {exc}") from exc
    assert statuses.count(200) >= 8, statuses
    # They really went to that server: its own counters saw them.
    text = httpx.get(real_server.base_url + "/metrics", timeout=10).text
    served = [line for line in text.splitlines() if line.startswith(
        'conveyor:http_requests_total{route="/v1/completions",status="200"}')]
    assert served and float(served[0].split()[-1]) >= 1


def test_schema_documents_request_bodies() -> None:
    """The handlers parse bodies themselves; the schema must still show them (else /docs
    and the fuzzer above would see bodiless POSTs)."""
    spec = TestClient(_app()).get("/openapi.json").json()
    for path, required in [("/v1/completions", ["prompt"]),
                           ("/v1/chat/completions", ["messages"]),
                           ("/openai/v1/completions", ["prompt"]),
                           ("/tokenize", []), ("/detokenize", ["tokens"])]:
        body = spec["paths"][path]["post"]["requestBody"]
        schema_ = body["content"]["application/json"]["schema"]
        assert schema_.get("required", []) == required, path
        assert "$ref" not in json.dumps(schema_), path  # self-contained


def test_docs_and_openapi_served() -> None:
    client = TestClient(_app())
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.json()["info"]["title"] == "Conveyor"
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger-ui" in r.text.lower()


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/v1/nope", None, 404),
    ("DELETE", "/v1/completions", None, 405),
    ("GET", "/v1/chat/completions", None, 405),
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"\xff\xfe\x00", 400),
    ("POST", "/v1/completions", b"[1, 2]", 400),
    ("POST", "/v1/completions", b"", 400),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
    ("POST", "/tokenize", b'{"prompt": 3}', 400),
    ("POST", "/detokenize", b'{"tokens": [-1]}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "model": "other"}', 404),
    # A seed past 64 bits used to crash the engine step (and so the server).
    ("POST", "/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', 400),
    # Python's JSON reads these; a NaN temperature used to sample garbage.
    ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', 400),
])
def test_hand_picked_bad_requests(method: str, path: str, body: bytes | None,
                                  status: int) -> None:
    r = TestClient(_app()).request(method, path, content=body,
                                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    check_response(r.status_code, r.headers["content-type"], r.text)
