"""The CI-sized soak: bench/soak.py with 200 requests against a tiny model's server.

20% of the requests are streams the client drops, 10% are invalid; the rest use random
sampling parameters. The run happens once per module; the tests read its JSON result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import main as soak_main

NUM_REQUESTS = 200


@pytest.fixture(scope="module")
def soak_result(tiny_model_factory, tmp_path_factory) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    code = soak_main([
        "--model", str(tiny_model_factory("llama")),
        # A small token budget bounds the batch shapes, so the warm-up sees them all.
        "--server-args", "--num-kv-blocks 256 --dtype float32 --max-num-batched-tokens 32",
        "--num-requests", str(NUM_REQUESTS), "--warmup", "100", "--concurrency", "12",
        "--max-tokens", "16", "--result-file", str(out), "--no-progress",
    ])
    assert out.with_suffix(".png").stat().st_size > 0
    return code, json.loads(Path(out).read_text())


def test_every_request_gets_what_it_should(soak_result) -> None:
    _, r = soak_result
    assert r["num_requests"] == NUM_REQUESTS
    assert r["failures"] == []
    kinds = r["kinds"]
    assert sum(kinds.values()) == NUM_REQUESTS
    assert r["ok"] == kinds
    # The seeded workload's mix: about 20% cancelled and 10% invalid.
    assert 0.12 * NUM_REQUESTS <= kinds["cancel"] <= 0.28 * NUM_REQUESTS
    assert 0.04 * NUM_REQUESTS <= kinds["invalid"] <= 0.16 * NUM_REQUESTS
    statuses = r["statuses"]
    assert set(statuses) <= {"200", "400", "404"}
    assert statuses.get("400", 0) + statuses.get("404", 0) == kinds["invalid"]
    assert set(r["finish_reasons"]) <= {"stop", "length"} and r["finish_reasons"]["length"]


def test_engine_empty_and_server_clean_afterwards(soak_result) -> None:
    _, r = soak_result
    zero = {"num_requests_running": 0.0, "num_requests_waiting": 0.0,
            "kv_cache_usage_perc": 0.0}
    assert r["engine_after_warmup"] == zero
    assert r["engine_after"] == zero
    assert r["server_exit_code"] == 0  # SIGTERM drained it cleanly


def test_no_memory_growth_after_warmup(soak_result) -> None:
    code, r = soak_result
    # Before linear layers padded their rows, every new batch size left oneDNN kernels
    # behind and the engine grew by tens of percent here.
    assert r["rss"]["server"]["growth"] < 0.05
    assert r["rss"]["engine"]["growth"] < 0.05
    assert code == 0 and r["passed"] and r["problems"] == []
