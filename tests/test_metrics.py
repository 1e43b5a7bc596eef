"""GET /metrics: exact counter values after known requests (scripted engine), route
templates and statuses, the vllm: names flag, and one real server's engine-side series."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.cli import build_parser
from server.frontend.app import build_app
from server.frontend.metrics import Metrics
from tests.fake_engine import FakeEngineClient
from tests.test_http_stream_unit import _call_then_disconnect, _long_engine, stream

MODEL = "fake-model"
CHAT = [{"role": "user", "content": "hi"}]
ENGINE_STATS = {"num_running": 0.0, "num_waiting": 0.0, "kv_cache_usage": 0.0,
                "num_free_blocks": 10.0, "num_kv_blocks": 10.0, "prefix_cache_queries": 40.0,
                "prefix_cache_hits": 16.0, "num_preemptions": 3.0, "engine_busy_seconds": 1.5}


class StatsEngine(FakeEngineClient):
    """The scripted engine, reporting a full SchedulerStats snapshot."""

    stats: dict[str, float] = ENGINE_STATS

    async def get_stats(self) -> dict[str, float]:
        return dict(self.stats)


def make(api_key: str | None = None, vllm_names: bool = False,
         **engine_kwargs) -> tuple[TestClient, StatsEngine]:
    engine = StatsEngine(**engine_kwargs)
    app = build_app(engine, engine.tokenizer, MODEL, api_key,
                    Metrics(MODEL, vllm_names=vllm_names))
    return TestClient(app, raise_server_exceptions=False), engine


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} for every sample of the exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(samples: dict, name: str, **labels: str) -> float:
    if not name.endswith("http_requests_total"):  # the only series without model_name
        labels.setdefault("model_name", MODEL)
    return samples[(name, frozenset(labels.items()))]


def metrics_of(client: TestClient) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    return scrape(r.text)


def test_counters_after_known_requests_equal_usage():
    client, _ = make()
    usages = []
    r = client.post("/v1/completions", json={"prompt": "hi"})  # 5 tokens, stop
    usages.append(r.json()["usage"])
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2})  # length
    usages.append(r.json()["usage"])
    chunks = stream(client, "/v1/completions", {"prompt": "abc", "max_tokens": 3,
                                                "stream_options": {"include_usage": True}})
    usages.append(chunks[-1]["usage"])
    chunks = stream(client, "/v1/chat/completions",
                    {"messages": CHAT, "stream_options": {"include_usage": True}})
    usages.append(chunks[-1]["usage"])
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 1000})
    assert r.status_code == 400
    m = metrics_of(client)

    p = "conveyor:"
    assert get(m, p + "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert get(m, p + "generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert get(m, p + "request_success_total", finished_reason="stop") == 2
    assert get(m, p + "request_success_total", finished_reason="length") == 2
    assert get(m, p + "request_success_total", finished_reason="abort") == 0
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_prompt_tokens", "request_generation_tokens"):
        assert get(m, p + h + "_count") == 4, h
    assert get(m, p + "request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usages)
    assert get(m, p + "request_generation_tokens_sum") == \
        sum(u["completion_tokens"] for u in usages)
    # One inter-token gap per token after each request's first.
    assert get(m, p + "inter_token_latency_seconds_count") == \
        sum(u["completion_tokens"] - 1 for u in usages)
    assert get(m, p + "e2e_request_latency_seconds_sum") >= \
        get(m, p + "time_to_first_token_seconds_sum") > 0
    assert get(m, p + "http_requests_total", route="/v1/completions", status="200") == 2
    assert get(m, p + "http_requests_total", route="/v1/chat/completions", status="200") == 2
    assert get(m, p + "http_requests_total", route="/v1/completions", status="400") == 1
    # Engine-side series come from the stats snapshot taken at scrape time.
    assert get(m, p + "num_requests_running") == 0
    assert get(m, p + "num_requests_waiting") == 0
    assert get(m, p + "kv_cache_usage_perc") == 0
    assert get(m, p + "prefix_cache_queries_total") == 40
    assert get(m, p + "prefix_cache_hits_total") == 16
    assert get(m, p + "engine_busy_seconds_total") == 1.5
    assert get(m, p + "num_preemptions_total") == 3
    # The scripted engine reports no engine timestamps: nothing to split e2e into.
    for h in ("queue", "prefill", "decode"):
        assert get(m, p + f"request_{h}_time_seconds_count") == 0
    assert not any(name.startswith("vllm:") for name, _ in m)


def test_engine_gauges_follow_the_snapshot():
    client, engine = make()
    engine.stats = {**ENGINE_STATS, "num_running": 2.0, "num_waiting": 1.0,
                    "kv_cache_usage": 0.25}
    m = metrics_of(client)
    assert get(m, "conveyor:num_requests_running") == 2
    assert get(m, "conveyor:num_requests_waiting") == 1
    assert get(m, "conveyor:kv_cache_usage_perc") == 0.25
    engine.ready = False  # no engine numbers to report: request-level series only
    m = metrics_of(client)
    assert ("conveyor:num_requests_running", frozenset({("model_name", MODEL)})) not in m
    assert ("conveyor:prompt_tokens_total", frozenset({("model_name", MODEL)})) in m


def test_n_and_multi_prompt_count_sequences_and_engine_requests():
    client, _ = make()
    r = client.post("/v1/completions", json={"prompt": ["a", "b"], "n": 2})
    usage = r.json()["usage"]
    m = metrics_of(client)
    assert get(m, "conveyor:prompt_tokens_total") == usage["prompt_tokens"] == 4
    assert get(m, "conveyor:generation_tokens_total") == usage["completion_tokens"]
    # Finish reasons per sequence (2 prompts x n=2), histograms per engine request.
    assert get(m, "conveyor:request_success_total", finished_reason="stop") == 4
    assert get(m, "conveyor:e2e_request_latency_seconds_count") == 2
    assert get(m, "conveyor:time_to_first_token_seconds_count") == 2


def test_non_stream_disconnect_aborts_every_sequence():
    engine = _long_engine()
    app = build_app(engine, engine.tokenizer, MODEL, None)
    app.state.ctx.disconnect_poll_s = 0.01
    asyncio.run(_call_then_disconnect(app, engine, "/v1/chat/completions",
                                      {"messages": CHAT, "n": 2}, after_first_chunk=False,
                                      after_s=0.1))
    m = metrics_of(TestClient(app))
    assert get(m, "conveyor:request_success_total", finished_reason="abort") == 2
    assert get(m, "conveyor:http_requests_total", route="/v1/chat/completions",
               status="499") == 1


def test_client_disconnect_counts_as_abort():
    engine = _long_engine()
    app = build_app(engine, engine.tokenizer, MODEL, None)
    asyncio.run(_call_then_disconnect(app, engine, "/v1/completions",
                                      {"prompt": "hi", "stream": True}, after_first_chunk=True))
    m = metrics_of(TestClient(app))
    assert get(m, "conveyor:request_success_total", finished_reason="abort") == 1
    assert get(m, "conveyor:request_success_total", finished_reason="stop") == 0
    assert get(m, "conveyor:prompt_tokens_total") == 3
    assert get(m, "conveyor:generation_tokens_total") >= 1
    assert get(m, "conveyor:time_to_first_token_seconds_count") == 1
    assert get(m, "conveyor:e2e_request_latency_seconds_count") == 0  # finished ones only


def test_metrics_open_with_api_key_and_routes_are_templates():
    client, _ = make(api_key="secret")
    auth = {"Authorization": "Bearer secret"}
    assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert client.get("/openai/v1/models/org/some-model", headers=auth).status_code == 404
    assert client.get("/v1/models/" + MODEL, headers=auth).status_code == 200
    assert client.get("/v1/completions", headers=auth).status_code == 405
    assert client.get("/no/such/path", headers=auth).status_code == 404
    assert client.get("/health").status_code == 200
    client.get("/metrics")
    m = metrics_of(client)  # open: no Authorization header
    http = {dict(k[1])["route"] + " " + dict(k[1])["status"]: v for k, v in m.items()
            if k[0] == "conveyor:http_requests_total"}
    assert http == {"/v1/completions 401": 1, "/openai/v1/models/{model_id} 404": 1,
                    "/v1/models/{model_id} 200": 1, "/v1/completions 405": 1,
                    "unmatched 404": 1, "/health 200": 1}  # /metrics itself not counted


def test_vllm_names_only_with_the_flag():
    client, _ = make(vllm_names=True)
    client.post("/v1/completions", json={"prompt": "hi"})
    m = metrics_of(client)
    conveyor = {(n[len("conveyor:"):], ls): v for (n, ls), v in m.items()
                if n.startswith("conveyor:") and not n.endswith("_created")}
    vllm = {(n[len("vllm:"):], ls): v for (n, ls), v in m.items()
            if n.startswith("vllm:") and not n.endswith("_created")}
    assert conveyor and conveyor == vllm  # the same observations under both prefixes
    assert get(m, "vllm:generation_tokens_total") == 5
    assert get(m, "vllm:num_preemptions_total") == 3

    assert build_parser().parse_args(["serve"]).vllm_metric_names is False
    assert build_parser().parse_args(["serve", "--vllm-metric-names"]).vllm_metric_names


def test_each_app_has_its_own_registry():
    a, _ = make()
    b, _ = make()
    a.post("/v1/completions", json={"prompt": "hi"})
    assert get(metrics_of(a), "conveyor:generation_tokens_total") == 5
    assert get(metrics_of(b), "conveyor:generation_tokens_total") == 0


# ---- a real server --------------------------------------------------------------------------

def test_real_server_metrics(tiny_model_factory):
    from tests.server_process import running_server

    model_dir = tiny_model_factory("llama")
    with running_server(model_dir, "--num-kv-blocks", "64", "--served-model-name", "tiny",
                        "--vllm-metric-names") as server:
        url = server.base_url
        usages = []
        for body in ({"prompt": "Hello there", "max_tokens": 6},
                     {"prompt": "Hello there", "max_tokens": 4, "stream": True,
                      "stream_options": {"include_usage": True}}):
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                text = r.read().decode()
            if body.get("stream"):
                events = [e[len("data: "):] for e in text.split("\n\n") if e]
                usages.append(json.loads(events[-2])["usage"])
            else:
                usages.append(json.loads(text)["usage"])
        r = httpx.get(url + "/metrics", timeout=10)
        assert r.status_code == 200
        m = scrape(r.text)

    def val(name: str, **labels: str) -> float:
        return m[(name, frozenset({"model_name": "tiny", **labels}.items()))]

    for p in ("conveyor:", "vllm:"):
        assert val(p + "prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
        assert val(p + "generation_tokens_total") == \
            sum(u["completion_tokens"] for u in usages)
        assert val(p + "request_success_total", finished_reason="length") == 2
        assert val(p + "e2e_request_latency_seconds_count") == 2
        assert val(p + "time_to_first_token_seconds_count") == 2
        assert val(p + "num_requests_running") == 0
        assert val(p + "num_requests_waiting") == 0
        assert val(p + "kv_cache_usage_perc") == 0
        # The second prompt repeats the first: its full blocks come from the prefix cache.
        assert val(p + "prefix_cache_queries_total") > 0
        assert val(p + "num_preemptions_total") == 0
        assert val(p + "engine_busy_seconds_total") > 0  # the engine ran steps
        # The engine's timestamps split each finished request's e2e latency.
        parts = 0.0
        for h in ("queue", "prefill", "decode"):
            assert val(p + f"request_{h}_time_seconds_count") == 2, h
            assert val(p + f"request_{h}_time_seconds_sum") >= 0, h
            parts += val(p + f"request_{h}_time_seconds_sum")
        e2e = val(p + "e2e_request_latency_seconds_sum")
        assert 0 < parts <= e2e
        # The rest is the front end's share (tokenizing, IPC, detokenizing): small here.
        assert e2e - parts < 1.0
        assert val(p + "request_prefill_time_seconds_sum") > 0  # a forward pass each
        assert val(p + "request_decode_time_seconds_sum") > 0  # 5 and 3 more tokens
