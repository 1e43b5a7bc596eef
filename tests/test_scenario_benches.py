"""The scenario benchmarks (prefix caching, chunked prefill) run end to end on a tiny model
with --smoke, and what they write holds the exact counts their workloads imply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, model_dir: Path, out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), CONVEYOR_NATIVE_CPU="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke",
                           "--device", "cpu", "--model-dir", str(model_dir), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


def test_prefix_cache_smoke(model_dir, tmp_path):
    res = _run("prefix_cache.py", model_dir, tmp_path / "prefix.json")
    cfg = res["config"]
    n, groups, rounds = cfg["num_requests"], cfg["num_groups"], cfg["rounds"]
    assert (n, groups, cfg["prefix_len"], cfg["output_len"]) == (8, 2, 64, 4)
    shared, unique = res["results"]["shared_prefix"], res["results"]["no_shared_prefix"]
    for r in (shared, unique):
        assert r["num_requests"] == n and r["output_tokens"] == n * cfg["output_len"]
        lo, hi = cfg["suffix_len"]
        assert n * (64 + lo) <= r["prompt_tokens"] <= n * (64 + hi)
        for mode in ("on", "off"):
            assert r["median"][mode]["tokens_per_s"] > 0
            assert r["median"][mode]["requests_per_s"] > 0
            assert len(r["runs"][mode]) == rounds
        # Caching off neither counts lookups nor serves cached tokens.
        assert all(x["prefix_cache_queries"] == 0 and x["cached_tokens"] == 0
                   for x in r["runs"]["off"])
        # Every prompt token is looked up once per run with caching on.
        assert r["prefix_cache_queries"] == r["prompt_tokens"]
        assert all(x["cached_tokens"] == x["prefix_cache_hits"] for x in r["runs"]["on"])
        assert all(x["scheduler_seconds"] > 0 for m in ("on", "off") for x in r["runs"][m])
        assert r["on_over_off"] > 0 and r["best_on_over_off"] > 0
        assert isinstance(r["meets_target"], bool)
    # Each group's first request computes its 64-token prefix; the other 6 hit it.
    assert shared["expected_hits"] == shared["prefix_cache_hits"] == (n - groups) * 64
    assert shared["hits_match_expected"]
    assert shared["hit_rate"] == pytest.approx((n - groups) * 64 / shared["prompt_tokens"])
    assert "speedup" in shared
    assert unique["prefix_cache_hits"] == unique["expected_hits"] == 0
    assert unique["hit_rate"] == 0 and "slowdown_pct" in unique
    # The A/A control engine (caching off, built first) runs the no-shared workload only.
    assert set(shared["runs"]) == {"on", "off"}
    assert set(unique["runs"]) == {"on", "off", "off-control"}
    assert len(unique["runs"]["off-control"]) == rounds and unique["control_over_off"] > 0
    assert all(x["prefix_cache_queries"] == 0 for x in unique["runs"]["off-control"])


def test_chunked_prefill_smoke(model_dir, tmp_path):
    res = _run("chunked_prefill.py", model_dir, tmp_path / "chunked.json")
    cfg = res["config"]
    decoders, long_len = cfg["num_decoders"], cfg["long_prompt_len"]
    assert (decoders, long_len, cfg["chunk_budgets"]) == (4, 300, [64])
    chunked, whole = res["results"]["chunked-64"], res["results"]["unchunked"]
    capped = res["results"]["cap-32"]
    # Decoders are scheduled first; the long prompt gets what is left of the budget.
    assert chunked["prefill_chunks"] == [60] * 5
    assert chunked["prefill_steps"] == 5
    # Capped: 32 tokens a step while the decoders run, although the budget (256) has room.
    assert (capped["max_num_batched_tokens"], capped["long_prefill_token_threshold"]) == (256, 32)
    assert capped["prefill_chunks"] == [32] * 9 + [12]
    assert whole["max_num_batched_tokens"] == long_len + decoders
    assert whole["prefill_chunks"] == [long_len] and whole["prefill_steps"] == 1
    for r in (chunked, capped, whole):
        assert r["rounds"] == cfg["rounds"] == len(r["per_round"])
        assert r["decoder_tokens_missed"] == 0 and r["num_preemptions"] == 0
        # Every decoder gets one token per prefill step, so one ITL sample each.
        assert all(x["itl_ms"]["count"] == decoders * r["prefill_steps"]
                   for x in r["per_round"])
        itl = r["itl_ms"]
        assert 0 < itl["p50"] <= itl["p99"] <= itl["max"]
        assert r["steady_step_ms"] > 0 and r["ttft_s"] > 0 and r["p99_over_steady"] > 0
        assert isinstance(r["meets_target"], bool)
        phases = [p["phase"] for p in r["timeline"]]
        assert phases.count("prefill") == r["prefill_steps"]
        assert phases.count("steady") == cfg["steady_steps"]
        assert phases.count("after") == cfg["after_steps"]
