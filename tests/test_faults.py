"""Faults: the engine process killed under load or while loading, and a KV cache that
cannot fit at start-up.

A dead engine must turn into errors, never a hang: every in-flight request gets an
OpenAI-shaped error (an SSE error event for streams, a 503 otherwise), health reports 503,
and `conveyor serve` exits non-zero. A KV cache that cannot be allocated stops start-up
with a message giving the bytes asked for and the bytes available.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import LLM
from server.config import CacheConfig, check_kv_cache_fits, resolve_num_kv_blocks
from tests.server_process import ROOT, free_port

NUM_STREAMS = 3
NUM_PLAIN = 3
ENGINE_DEAD = ("server_error", "engine_dead")


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


class LoggedServer:
    """`conveyor serve` with its output kept in a file (tests/server_process.py drops it)."""

    def __init__(self, model_dir: Path, log_path: Path, *extra: str) -> None:
        self.base_url = f"http://127.0.0.1:{(port := free_port())}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--port",
             str(port), "--dtype", "float32", *extra],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError("server did not become healthy")

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def assert_engine_dead_error(body: dict) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["code"]) == ENGINE_DEAD and "engine" in err["message"]


async def _load_then_kill(base_url: str, engine_pid: int) -> list:
    """Streams and plain requests in flight, then SIGKILL the engine; returns outcomes."""
    body = {"max_tokens": 480, "ignore_eos": True, "temperature": 0}
    first_chunks = [asyncio.Event() for _ in range(NUM_STREAMS)]

    async with httpx.AsyncClient(base_url=base_url, timeout=60) as ac:
        async def stream(i: int) -> tuple[int, list[str]]:
            lines: list[str] = []
            async with ac.stream("POST", "/v1/completions",
                                 json={**body, "prompt": f"Stream {i}", "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
                        first_chunks[i].set()
                return r.status_code, lines

        async def plain(i: int) -> httpx.Response:
            return await ac.post("/v1/completions", json={**body, "prompt": f"Plain {i}"})

        tasks = [asyncio.create_task(stream(i)) for i in range(NUM_STREAMS)]
        tasks += [asyncio.create_task(plain(i)) for i in range(NUM_PLAIN)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in first_chunks)), 60)
        # All six are running in the engine (not queued in the front end) when it dies.
        async def all_running() -> None:
            while ((await ac.get("/internal/stats")).json()["num_running"]
                   < NUM_STREAMS + NUM_PLAIN):
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_running(), 30)
        os.kill(engine_pid, signal.SIGKILL)
        # Never a hang: everything in flight must be answered promptly.
        return await asyncio.wait_for(asyncio.gather(*tasks), 20)


def test_engine_killed_under_load_errors_everything_and_exits_nonzero(model_dir, tmp_path):
    server = LoggedServer(model_dir, tmp_path / "serve.log", "--num-kv-blocks", "256")
    try:
        server.wait_healthy()
        pid = httpx.get(server.base_url + "/internal/stats", timeout=10).json()["engine_pid"]
        results = asyncio.run(_load_then_kill(server.base_url, pid))
        for status, lines in results[:NUM_STREAMS]:
            assert status == 200
            assert lines[-1] == "data: [DONE]"
            assert_engine_dead_error(json.loads(lines[-2].removeprefix("data: ")))
            assert all('"error"' not in line for line in lines[:-2])
        for r in results[NUM_STREAMS:]:
            assert r.status_code == 503
            assert_engine_dead_error(r.json())
        # Health is 503 for as long as the server still answers, then it is gone.
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(server.base_url + "/health", timeout=2)
            assert r.status_code == 503
            assert_engine_dead_error(r.json())
        code = server.wait_exit(20)
        assert code == 1
        assert "exiting: engine process exited" in server.output()
    finally:
        server.stop()


def _engine_child(server_pid: int, timeout: float = 30.0) -> int:
    """The spawned engine process of a server (not multiprocessing's resource tracker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                status = (entry / "status").read_text()
                ppid = next(int(line.split()[1]) for line in status.splitlines()
                            if line.startswith("PPid:"))
                if ppid == server_pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                    return int(entry.name)
        time.sleep(0.05)
    raise TimeoutError("no engine process appeared")


def test_engine_killed_while_loading_the_model(model_dir, tmp_path):
    """A request while the model loads gets a 503 (never a hang), and the server exits 1."""
    server = LoggedServer(model_dir, tmp_path / "serve.log", "--num-kv-blocks", "64")
    try:
        pid = _engine_child(server.proc.pid)

        async def waiting_request() -> httpx.Response:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as ac:
                while True:  # the front end listens at once; health says "loading"
                    with contextlib.suppress(httpx.ConnectError):
                        r = await ac.get("/health")
                        assert r.status_code == 503
                        assert r.json()["error"]["code"] == "engine_not_ready"
                        break
                    await asyncio.sleep(0.05)
                pending = asyncio.create_task(
                    ac.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}))
                await asyncio.sleep(0.3)  # answered or waiting by now
                os.kill(pid, signal.SIGKILL)
                return await asyncio.wait_for(pending, 20)

        r = asyncio.run(waiting_request())
        assert r.status_code == 503
        err = r.json()["error"]
        assert err["type"] == "server_error"
        assert err["code"] in ("engine_not_ready", "engine_dead")
        assert server.wait_exit(20) == 1
        assert "exiting: engine process exited (exit code -9)" in server.output()
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    """Running (an exited orphan may linger as a zombie until init reaps it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_engine_exits_when_the_server_is_killed(model_dir, tmp_path):
    """No orphan: a SIGKILLed front end leaves an engine that notices and exits."""
    server = LoggedServer(model_dir, tmp_path / "serve.log", "--num-kv-blocks", "64")
    try:
        server.wait_healthy()
        pid = httpx.get(server.base_url + "/internal/stats", timeout=10).json()["engine_pid"]
        server.proc.kill()
        server.proc.wait(10)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        server.stop()


def test_dead_engine_health_and_new_requests_are_503(model_dir):
    """In process, so the server's own exit cannot race the probes."""
    from transformers import AutoTokenizer

    from server.config import CacheConfig, EngineConfig, ModelConfig
    from server.frontend.app import build_app
    from server.frontend.async_engine import AsyncEngine

    async def scenario() -> None:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        config = EngineConfig(model=ModelConfig(model=str(model_dir), dtype="float32"),
                              cache=CacheConfig(num_kv_blocks=64))
        engine = AsyncEngine(config, tok, frozenset({1}))
        try:
            await asyncio.wait_for(engine.wait_ready(), 120)
            app = build_app(engine, tok, "tiny", None)
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
                assert (await ac.get("/health")).status_code == 200
                engine.process.kill()
                await asyncio.wait_for(engine.dead.wait(), 10)
                for path in ("/health", "/v2/health/ready", "/internal/stats"):
                    r = await ac.get(path)
                    assert r.status_code == 503, path
                    assert_engine_dead_error(r.json())
                r = await ac.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert r.status_code == 503
                assert_engine_dead_error(r.json())
                assert (await ac.get("/v2/health/live")).status_code == 200
                assert (await ac.get("/metrics")).status_code == 200
        finally:
            await engine.shutdown()
        assert engine.dead_reason is not None and "exit code -9" in engine.dead_reason

    asyncio.run(scenario())


def test_kv_cache_larger_than_memory_stops_start_up(model_dir, tmp_path):
    blocks = 10**12  # petabytes: must be refused before anything is allocated
    server = LoggedServer(model_dir, tmp_path / "serve.log", "--num-kv-blocks", str(blocks))
    try:
        code = server.wait_exit(120)
        out = server.output()
        assert code == 1, out
        assert "the KV cache asks for" in out and f"{blocks} blocks x " in out
        assert "GiB) are available on cpu" in out
    finally:
        server.stop()


@pytest.mark.parametrize(("kwargs", "expected"), [
    (dict(kv_cache_memory=1000), ["KV cache budget of 1000 bytes holds no block of",
                                  "available on cpu"]),
    (dict(num_kv_blocks=2), ["holds 2 blocks x 16 tokens = 32 tokens",
                             "max_model_len=512, which needs 32 blocks =",
                             "available on cpu"]),
])
def test_kv_cache_too_small_message(model_dir, kwargs, expected):
    with pytest.raises(ValueError) as info:
        LLM(str(model_dir), dtype="float32", **kwargs)
    for part in expected:
        assert part in str(info.value)


def test_check_kv_cache_fits_states_asked_and_available():
    check_kv_cache_fits(10, 1024, 16, 160, "cpu", 10 * 1024)  # exactly fits: fine
    check_kv_cache_fits(10, 1024, 16, 160, "cpu", None)  # unknown memory: no memory check
    with pytest.raises(ValueError) as info:
        check_kv_cache_fits(10, 1024, 16, 160, "cuda", 10 * 1024 - 1)
    assert str(info.value).startswith(
        "the KV cache asks for 10240 bytes (0.00 GiB: 10 blocks x 1024 bytes) but only "
        "10239 bytes (0.00 GiB) are available on cuda")
    with pytest.raises(ValueError) as info:
        check_kv_cache_fits(9, 1024, 16, 160, "cpu", 2**30)
    assert str(info.value).startswith(
        "the KV cache holds 9 blocks x 16 tokens = 144 tokens (9216 bytes), fewer than "
        "max_model_len=160, which needs 10 blocks = 10240 bytes (1073741824 bytes "
        "(1.00 GiB) available on cpu)")


def test_default_cpu_kv_cache_fits_a_small_machine():
    mib = 1 << 20
    # 4 GiB by default, or half the free host memory when that is less; explicit sizes and
    # counts are taken as given (and checked by check_kv_cache_fits).
    assert resolve_num_kv_blocks(CacheConfig(), mib, "cpu", 64 << 30) == 4096
    assert resolve_num_kv_blocks(CacheConfig(), mib, "cpu", 3 << 30) == 1536
    assert resolve_num_kv_blocks(CacheConfig(), mib, "cpu", None) == 4096
    assert resolve_num_kv_blocks(CacheConfig(kv_cache_memory=8 << 30), mib, "cpu",
                                 3 << 30) == 8192
    assert resolve_num_kv_blocks(CacheConfig(num_kv_blocks=5), mib, "cpu", 1) == 5
