"""Priority and tenants through the front end, the engine process loop and a real model:
the fields arrive where the scheduler reads them, and fairness preemptions (recompute)
leave greedy outputs unchanged. Scheduling rules are tested in test_fair_scheduling.py."""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pipe

import httpx
import pytest
from fastapi.testclient import TestClient

from server import LLM
from server.engine_proc import AddRequest, run_loop
from server.frontend.app import build_app
from server.frontend.tenants import KeySpec, Tenants
from server.request import Request
from server.sampling_params import SamplingParams
from tests.fake_engine import FakeEngineClient
from tests.server_process import running_server


def test_http_priority_and_tenant_reach_the_engine() -> None:
    engine = FakeEngineClient()
    keys = {"sk-a": KeySpec("team-a", weight=3.0)}
    app = build_app(engine, engine.tokenizer, "m", None, tenants=Tenants(keys))
    client = TestClient(app, raise_server_exceptions=False)
    auth = {"Authorization": "Bearer sk-a"}
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": -5},
                    headers=auth)
    assert r.status_code == 200
    r = client.post("/v1/chat/completions", headers=auth, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert [(s.priority, s.tenant, s.tenant_weight) for s in engine.requests] == \
        [(-5, "team-a", 3.0), (0, "team-a", 3.0)]
    for bad in (1_000_001, -1_000_001):
        r = client.post("/v1/completions", json={"prompt": "hi", "priority": bad}, headers=auth)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "priority"
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", json={"prompt": "hi", "priority": "high"}, headers=auth)
    assert r.status_code == 400 and len(engine.requests) == 2


def test_engine_process_loop_builds_requests_with_scheduling_fields() -> None:
    class Core:
        def __init__(self) -> None:
            self.added: list[Request] = []

        def has_unfinished_requests(self) -> bool:
            return False

        def add_request(self, request: Request) -> None:
            self.added.append(request)

    inbox, to_engine = Pipe(duplex=False)
    _, outbox = Pipe(duplex=False)
    params = SamplingParams(max_tokens=3)
    to_engine.send(AddRequest("r1", [5, 6], params, 3, None, 1.0, 7, "team-a", 2.5))
    to_engine.send(AddRequest("r2", [5], params, 3, None, 2.0))
    to_engine.send(("shutdown",))
    core = Core()
    run_loop(core, frozenset({1}), inbox, outbox)
    assert [(r.request_id, r.priority, r.tenant, r.tenant_weight) for r in core.added] == \
        [("r1", 7, "team-a", 2.5), ("r2", 0, None, 1.0)]


def test_engine_outputs_identical_with_fairness_preemptions(tiny_model_factory) -> None:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(4, 40))] for _ in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm = LLM(str(tiny_model_factory("llama")), dtype="float32", num_kv_blocks=64,
              max_num_seqs=4, max_num_batched_tokens=32)
    plain = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    assert llm.engine.core.scheduler.num_preemptions == 0

    engine = llm.engine
    got: dict[str, list[int]] = {}

    def run(steps: int | None = None) -> None:
        n = 0
        while engine.has_unfinished_requests() and (steps is None or n < steps):
            for out in engine.step():
                got.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            n += 1

    for i in range(5):  # tenant a fills the 4 slots
        engine.add_request(f"p{i}", {"prompt_token_ids": prompts[i]}, params, tenant="a")
    run(steps=3)
    engine.add_request("p5", {"prompt_token_ids": prompts[5]}, params, tenant="b",
                       tenant_weight=2.0)
    engine.add_request("p6", {"prompt_token_ids": prompts[6]}, params, tenant="b",
                       tenant_weight=2.0)
    engine.add_request("p7", {"prompt_token_ids": prompts[7]}, params, tenant="a", priority=-1)
    run()
    # p7 (priority -1) displaces a's p3; b (weight 2) then takes two of a's slots, one per
    # step: preemptions that recompute, and the same greedy tokens.
    assert engine.core.scheduler.num_preemptions == 3
    assert [got[f"p{i}"] for i in range(8)] == plain
    # Offline priorities: one per prompt, or one for all.
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params,
                        use_tqdm=False, priority=[1, 0])
    assert [o.outputs[0].token_ids for o in outs] == plain[:2]
    with pytest.raises(ValueError, match="priorities"):
        llm.generate([{"prompt_token_ids": prompts[0]}], params, priority=[1, 2])
    with pytest.raises(ValueError, match="tenant_weight"):
        engine.add_request("bad", {"prompt_token_ids": prompts[0]}, params, tenant_weight=0)


def test_real_server_runs_the_better_priority_first(tiny_model_factory) -> None:
    """One slot: A runs, B (priority 5) queues, C (priority -1) preempts A: C, A, B end in
    that order, and A (recomputed after its preemption) still gets all its tokens."""

    def body(priority: int, max_tokens: int) -> dict:
        return {"prompt": [5, 6, 7], "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "priority": priority}

    with running_server(tiny_model_factory("llama"), "--num-kv-blocks", "64",
                        "--max-num-seqs", "1") as srv:
        url = srv.base_url + "/v1/completions"
        finished: dict[str, float] = {}

        def post(name: str, priority: int) -> None:
            r = httpx.post(url, json=body(priority, 4), timeout=60)
            finished[name] = time.monotonic()
            assert r.status_code == 200, r.text

        def stats() -> dict:
            return httpx.get(srv.base_url + "/internal/stats", timeout=10).json()

        with ThreadPoolExecutor(2) as pool, httpx.stream(
                "POST", url, json={**body(0, 160), "stream": True,
                                   "stream_options": {"include_usage": True}},
                timeout=60) as stream:
            lines = (line for line in stream.iter_lines() if line.startswith("data: {"))
            chunks = [json.loads(next(lines)[6:])]
            b = pool.submit(post, "B", 5)
            while stats()["num_waiting"] < 1:
                time.sleep(0.005)
            c = pool.submit(post, "C", -1)
            chunks += [json.loads(line[6:]) for line in lines]
            finished["A"] = time.monotonic()
            b.result(), c.result()
        assert sorted(finished, key=finished.__getitem__) == ["C", "A", "B"]
        assert stats()["num_preemptions"] == 1
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 160
