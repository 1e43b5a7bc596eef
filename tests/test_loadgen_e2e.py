"""The load generator against a real `conveyor serve` on a tiny model: the token counts it
reports must be the server's own (usage, and /tokenize as the oracle for chat prompts)."""

from __future__ import annotations

import json

import httpx
import pytest

from server.benchmarks import workloads as wl
from server.benchmarks.serve import main


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def server(tiny_llama_server):
    return tiny_llama_server


def test_completions_token_counts_match_usage(server, model_dir, tmp_path):
    out = tmp_path / "r.json"
    rc = main(["--base-url", server.base_url, "--tokenizer", str(model_dir),
               "--num-prompts", "8", "--input-len", "24", "--output-len", "6",
               "--range-ratio", "0.5", "--max-concurrency", "4", "--seed", "3",
               "--goodput", "e2el:600000", "--disable-tqdm", "--result-file", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    report, records = data["report"], data["records"]
    assert data["config"]["model"] == "tiny"  # from GET /v1/models
    assert (report["completed"], report["failed"], report["errors"]) == (8, 0, {})
    # Prompts are token ids: the server's usage must equal the generated lengths exactly,
    # and ignore_eos makes every request produce max_tokens.
    tok = wl.load_tokenizer(str(model_dir))
    pool = wl.token_pool(None, tok.vocab_size, tok.special_ids)
    specs = wl.random_workload(8, 24, 6, 0.5, pool, seed=3)
    assert [r["prompt_tokens"] for r in records] == [s.prompt_len for s in specs]
    assert [r["expected_prompt_tokens"] for r in records] == [s.prompt_len for s in specs]
    assert [r["output_tokens"] for r in records] == [s.output_len for s in specs]
    assert report["total_input_tokens"] == sum(s.prompt_len for s in specs)
    assert report["total_output_tokens"] == sum(s.output_len for s in specs)
    assert report["peak_concurrency"] <= 4
    assert report["goodput"] == pytest.approx(report["request_throughput"])
    assert all(r["success"] and r["chunk_times"] for r in records)
    png = tmp_path / "r_latency_cdf.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_sweep_prompt_counts_match_tokenize(server, model_dir, tmp_path):
    out = tmp_path / "s.json"
    rc = main(["--base-url", server.base_url + "/v1", "--endpoint", "chat",
               "--tokenizer", str(model_dir), "--dataset", "prefix", "--prefix-groups", "2",
               "--prefix-len", "16", "--input-len", "8", "--output-len", "5",
               "--num-prompts", "4", "--sweep", "50,inf", "--disable-tqdm",
               "--result-file", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [run["request_rate"] for run in data["sweep"]] == ["50", "inf"]
    tok = wl.load_tokenizer(str(model_dir))
    specs = wl.as_chat(wl.prefix_workload(
        4, 2, 16, 8, 5, 0.0, wl.token_pool(None, tok.vocab_size, tok.special_ids), seed=0),
        tok.decode)
    # The chat template adds tokens, so the oracle is the server's own /tokenize.
    expected = [httpx.post(server.base_url + "/tokenize", json={"messages": s.messages},
                           timeout=30).json()["count"] for s in specs]
    for run in data["sweep"]:
        assert run["report"]["failed"] == 0
        assert [r["prompt_tokens"] for r in run["records"]] == expected
        assert [r["output_tokens"] for r in run["records"]] == [5] * 4
    for name in ("s_latency_cdf.png", "s_sweep.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
