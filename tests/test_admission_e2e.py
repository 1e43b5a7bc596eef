"""Admission flags on a real `conveyor serve` (tiny model): --request-timeout aborts the
request in the engine and frees its KV blocks; --api-keys-file keys are rate-limited."""

from __future__ import annotations

import json
import re
import time

import httpx

from tests.server_process import running_server

KEY = "sk-e2e-team"
ADMIN = {"Authorization": "Bearer sk-admin"}


def _stats(base_url: str) -> dict:
    return httpx.get(base_url + "/internal/stats", headers=ADMIN, timeout=10).json()


def test_timeout_frees_the_engine_and_keys_are_limited(tiny_model_factory, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  {KEY}: {{tenant: e2e, requests_per_minute: 3}}\n")
    with running_server(tiny_model_factory("llama"), "--num-kv-blocks", "64",
                        "--request-timeout", "0.5", "--api-keys-file", str(keys),
                        "--api-key", "sk-admin") as server:
        url = server.base_url + "/v1/completions"
        # Hundreds of tokens take seconds on a CPU: both requests outlive the timeout.
        long = {"prompt": "Count with me", "max_tokens": 480, "ignore_eos": True}
        r = httpx.post(url, json=long, headers=ADMIN, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", url, json={**long, "stream": True}, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}"}) as s:
            assert s.status_code == 200
            assert s.headers["x-ratelimit-remaining-requests"] == "2"
            events = [line for line in s.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_timeout"
        assert len(events) > 3  # some tokens streamed before the cut
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            stats = _stats(server.base_url)
            if stats["num_running"] == 0 and stats["num_waiting"] == 0:
                break
            time.sleep(0.1)
        assert (stats["num_running"], stats["num_waiting"]) == (0, 0)
        assert stats["kv_cache_usage"] == 0.0
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
        assert re.search(r"^conveyor:request_timeouts_total\{[^}]*\} 2\.0$", metrics, re.M)
        assert "conveyor:frontend_queued_requests{" in metrics
