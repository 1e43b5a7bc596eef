"""bench/scheduler_overhead.py end to end at smoke size, and the zero-cost runner's contract.

Timings are never asserted: only the JSON's shape and counts the workload fixes exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.fake_runner import FakeRunner, PhaseTimer, summarize
from server.config import CacheConfig, SchedulerConfig
from server.engine.core import EngineCore
from server.engine.scheduler import Scheduler
from server.request import Request
from server.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
FAKE_PHASES = {"schedule", "runner", "update", "engine_step", "schedule+update"}
REAL_PHASES = {"schedule", "update", "runner", "forward", "lm_head", "sample", "flat_batch",
               "attn_metadata", "sampling_metadata", "detokenize", "step", "model",
               "prepare_inputs", "runner_other", "step_other", "outside_model"}


@pytest.fixture(scope="module")
def smoke(tiny_model_factory, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CONVEYOR_NATIVE_CPU="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scheduler_overhead.py"), "--smoke",
         "--model-dir", str(tiny_model_factory("llama")), "--attention-backend", "torch",
         "--dtype", "float32", "--result-file", str(out)],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), out


def test_zero_cost_runs_decode_every_sequence_every_step(smoke) -> None:
    res, _ = smoke
    cfg, fake = res["config"], res["fake_model"]
    steps, warmup = cfg["steps"], cfg["warmup"]
    assert (steps, warmup, cfg["sweep"], cfg["num_running"]) == (5, 2, [4, 8], 8)
    assert [r["num_running"] for r in fake["sweep"]] == [4, 8]
    assert fake["baseline"]["name"] == "n8-prefix_on-output_offline"
    assert [(r["prefix_caching"], r["output"], r["gc_freeze"]) for r in fake["variants"]] == [
        (False, "offline", False), (True, "none", False), (True, "stream", False),
        (True, "offline", True)]
    for run in fake["sweep"] + fake["variants"]:
        n, c = run["num_running"], run["counts"]
        # All prompts (<= 8 x 24 tokens) fit one 2048-token step, each sampling once.
        assert c["fill_steps"] == 1
        assert c["measured_steps"] == steps
        assert c["scheduled_tokens"] == c["sampled_tokens"] == c["emitted_tokens"] \
            == c["expected_tokens"] == n * steps
        assert c["total_output_tokens"] == c["runner_sampled_total"] == n * (1 + warmup + steps)
        assert c["preemptions"] == 0 and c["drained"] is True
        phases = set(run["phases_us"])
        if run["output"] == "none":
            assert phases == FAKE_PHASES and "detokenized_tokens" not in c
        else:
            assert phases == FAKE_PHASES | {"output", "step_with_output"}
            assert c["detokenized_tokens"] == c["total_output_tokens"]
        for stats in run["phases_us"].values():
            assert set(stats) == {"mean", "p50", "p99", "max"}
        assert len(run["gc_passes_by_generation"]) == 3
        assert len(run["full_gc_ms"]) == run["gc_passes_by_generation"][2]
        assert len(run["trial_engine_step_p50_us"]) == cfg["repeat"] == 2
        assert run["phases_us"]["engine_step"]["p50"] == min(run["trial_engine_step_p50_us"])


def test_real_model_phases_cover_each_step_once(smoke) -> None:
    res, out = smoke
    real = res["real_model"]
    batch, steps = res["config"]["batch"], res["config"]["real_steps"]
    assert (batch, steps) == (4, 3)
    c = real["counts"]
    assert c["measured_steps"] == steps
    assert c["tokens"] == c["expected_tokens"] == batch * steps
    # One model call, one lm_head, one sampler call... per decode step.
    assert {k: c["calls"][k] for k in ("step", "schedule", "runner", "forward", "lm_head",
                                        "sample", "flat_batch", "sampling_metadata",
                                        "update", "detokenize")} == dict.fromkeys(
        ("step", "schedule", "runner", "forward", "lm_head", "sample", "flat_batch",
         "sampling_metadata", "update", "detokenize"), steps)
    assert set(real["phases_ms"]) == REAL_PHASES
    assert real["forward_ms_per_step"] == real["phases_ms"]["model"]["p50"]
    assert 0.0 < real["outside_model_share"] < 1.0
    assert 0.0 < real["outside_model_share_p50"] < 1.0
    assert real["attention_backend"] == "torch"
    assert out.with_suffix(".png").stat().st_size > 0


def test_fake_runner_samples_only_rows_whose_prompt_is_complete() -> None:
    sched = Scheduler(SchedulerConfig(4, 8, 64), CacheConfig(block_size=4), 32)
    runner = FakeRunner(vocab_size=10)
    core = EngineCore(sched, runner)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    core.add_request(Request("a", list(range(6)), params))  # 6 tokens: a chunk of 6 fits
    core.add_request(Request("b", list(range(10, 15)), params))  # gets 2, then 3 more
    steps = []
    while core.has_unfinished_requests():
        steps.append({o.req_id: o.new_token_ids for o in core.step()})
    # LCG ids in [3, 10): a samples at step 1, b once its prompt completes at step 2.
    tok = [len(s.get("a", [])) + len(s.get("b", [])) for s in steps]
    assert tok == [1, 2, 2, 1]
    assert all(3 <= t < 10 for s in steps for ids in s.values() for t in ids)
    assert (runner.num_steps, runner.num_scheduled_tokens, runner.num_sampled_tokens) == (
        4, (6 + 2) + (1 + 3) + (1 + 1) + 1, 6)
    core.step()
    assert runner.num_requests == 0


def test_phase_timer_keeps_recorded_steps_only() -> None:
    timer = PhaseTimer()
    calls: list[int] = []
    f = timer.wrap("f", calls.append)
    timer.wrap("g", calls.append)  # registered, never called: counts 0 per step
    f(1)
    timer.end_step()  # not recording: dropped
    timer.recording = True
    f(2)
    f(3)
    timer.end_step()
    timer.end_step()
    assert calls == [1, 2, 3]
    assert timer.calls == {"f": 2, "g": 0}
    assert len(timer.samples["f"]) == 2 and timer.samples["f"][1] == 0
    assert timer.samples["g"] == [0, 0]
    assert summarize([3000, 1000, 2000], 1e3) == {"mean": 2.0, "p50": 2.0, "p99": 3.0,
                                                  "max": 3.0}
