"""/metrics series beyond the request counters: the engine-timed queue / prefill / decode
histograms, NVML GPU gauges (fake NVML; absent on a machine without one) and the
--cost-per-hour series under an injected clock. Exact values throughout."""

from __future__ import annotations

import asyncio
import ctypes
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.cli import build_parser, parse_args
from server.frontend.app import build_app
from server.frontend.gpu_stats import GPUSample, GPUStats, load_nvml
from server.frontend.metrics import REQUEST_TIME_BUCKETS, Metrics
from server.outputs import RequestOutput, RequestTimes
from server.sampling_params import SamplingParams
from tests.fake_engine import FakeEngineClient
from tests.test_http_stream_unit import _call_then_disconnect, _long_engine
from tests.test_metrics import get, metrics_of, scrape

MODEL = "fake-model"
# Every request the timed engine serves: 0.25 s queued, 0.5 s prefill, 1.25 s decode.
TIMES = RequestTimes(100.0, 100.25, 100.75, 102.0)


class TimedEngine(FakeEngineClient):
    """The scripted engine, reporting TIMES on each finished request as the real one does."""

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        async for out in super().generate(request_id, prompt, prompt_token_ids, params,
                                          **kwargs):
            if out.finished:
                out.metrics = TIMES
            yield out


def client_for(metrics: Metrics, engine: FakeEngineClient | None = None) -> TestClient:
    engine = engine or TimedEngine()
    return TestClient(build_app(engine, engine.tokenizer, MODEL, None, metrics))


def names(m: dict) -> set[str]:
    return {name for name, _ in m}


# ---- queue / prefill / decode ---------------------------------------------------------------

def test_timing_histograms_count_finished_requests_with_exact_sums():
    client = client_for(Metrics(MODEL, vllm_names=True, gpu_stats=GPUStats(lambda: None)))
    assert client.post("/v1/completions", json={"prompt": ["a", "b"]}).status_code == 200
    assert client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "stream": True}).status_code == 200
    m = metrics_of(client)
    for p in ("conveyor:", "vllm:"):
        finished = get(m, p + "e2e_request_latency_seconds_count")
        assert finished == 3
        for name, each in (("queue", 0.25), ("prefill", 0.5), ("decode", 1.25)):
            h = f"{p}request_{name}_time_seconds"
            assert get(m, h + "_count") == finished
            assert get(m, h + "_sum") == 3 * each
            # All three land in the first bucket that holds them, none below it.
            first = min(b for b in REQUEST_TIME_BUCKETS if b >= each)
            below = max((b for b in REQUEST_TIME_BUCKETS if b < each), default=None)
            assert get(m, h + "_bucket", le=str(first)) == 3
            if below is not None:
                assert get(m, h + "_bucket", le=str(below)) == 0


def test_aborted_and_untimed_requests_are_not_observed():
    engine = _long_engine()
    metrics = Metrics(MODEL, gpu_stats=GPUStats(lambda: None))
    app = build_app(engine, engine.tokenizer, MODEL, None, metrics)
    asyncio.run(_call_then_disconnect(app, engine, "/v1/completions",
                                      {"prompt": "hi", "stream": True}, after_first_chunk=True))
    client = TestClient(app)
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})  # no times given
    m = metrics_of(client)
    assert get(m, "conveyor:e2e_request_latency_seconds_count") == 1
    for name in ("queue", "prefill", "decode"):
        assert get(m, f"conveyor:request_{name}_time_seconds_count") == 0


# ---- GPU (NVML) -----------------------------------------------------------------------------

NOT_SUPPORTED = 3  # nvmlReturn_t NVML_ERROR_NOT_SUPPORTED
HANDLE_BASE = 0x1000


class FakeNVML:
    """libnvidia-ml's calls as GPUStats makes them: ctypes pointers in, a status out.

    `devices`: (utilization percent or None for not supported, used bytes, total bytes).
    """

    def __init__(self, devices: list[tuple[int | None, int, int]], init_status: int = 0
                 ) -> None:
        self.devices = devices
        self.init_status = init_status
        self.calls: list[str] = []

    def nvmlInit_v2(self) -> int:
        self.calls.append("init")
        return self.init_status

    def nvmlShutdown(self) -> int:
        self.calls.append("shutdown")
        return 0

    def nvmlDeviceGetCount_v2(self, count: Any) -> int:
        count.contents.value = len(self.devices)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index: ctypes.c_uint, handle: Any) -> int:
        handle.contents.value = HANDLE_BASE + index.value
        return 0

    def nvmlDeviceGetUtilizationRates(self, handle: ctypes.c_void_p, util: Any) -> int:
        percent = self.devices[handle.value - HANDLE_BASE][0]
        if percent is None:
            return NOT_SUPPORTED
        util.contents.gpu, util.contents.memory = percent, 1
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle: ctypes.c_void_p, mem: Any) -> int:
        _, used, total = self.devices[handle.value - HANDLE_BASE]
        mem.contents.total, mem.contents.used, mem.contents.free = total, used, total - used
        return 0


H200 = 150_754_820_096


def test_fake_nvml_values_are_exported_exactly():
    nvml = FakeNVML([(37, 12_345_678_848, H200), (None, 1 << 30, 20 << 30)])
    stats = GPUStats(lambda: nvml)
    assert stats.read() == [GPUSample(0, 0.37, 12_345_678_848, H200),
                            GPUSample(1, None, 1 << 30, 20 << 30)]
    client = client_for(Metrics(MODEL, vllm_names=True, gpu_stats=stats))
    for _ in range(2):
        m = metrics_of(client)
    assert nvml.calls == ["init"]  # initialized once, on the first read
    for p in ("conveyor:", "vllm:"):
        assert get(m, p + "gpu_utilization_perc", gpu="0") == 0.37
        assert get(m, p + "gpu_memory_used_bytes", gpu="0") == 12_345_678_848
        assert get(m, p + "gpu_memory_total_bytes", gpu="0") == H200
        # A MIG slice reports memory but no utilization: that one sample is absent.
        assert (p + "gpu_utilization_perc", frozenset({("model_name", MODEL),
                                                       ("gpu", "1")})) not in m
        assert get(m, p + "gpu_memory_used_bytes", gpu="1") == 1 << 30
        assert get(m, p + "gpu_memory_total_bytes", gpu="1") == 20 << 30
    stats.close()
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("loader", [lambda: None, lambda: FakeNVML([], init_status=9),
                                    lambda: FakeNVML([]), lambda: object()])
def test_no_nvml_no_gpu_series(loader):
    """No library, a failed init, no devices, a library missing the calls: all absent."""
    client = client_for(Metrics(MODEL, gpu_stats=GPUStats(loader)))
    m = metrics_of(client)
    assert get(m, "conveyor:prompt_tokens_total") == 0
    assert not any("gpu_" in n for n in names(m))


# NVML's C signatures, implemented over two fake devices (the second without utilization).
FAKE_NVML_C = r"""
typedef struct { unsigned int gpu, memory; } util_t;
typedef struct { unsigned long long total, free, used; } mem_t;
static int devices[2] = {0, 1};
int nvmlInit_v2(void) { return 0; }
int nvmlShutdown(void) { return 0; }
int nvmlDeviceGetCount_v2(unsigned int *n) { *n = 2; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, void **h) {
    if (i > 1) return 2;
    *h = &devices[i]; return 0;
}
int nvmlDeviceGetUtilizationRates(void *h, util_t *u) {
    if (*(int *)h == 1) return 3;
    u->gpu = 81; u->memory = 12; return 0;
}
int nvmlDeviceGetMemoryInfo(void *h, mem_t *m) {
    m->total = 150754820096ULL + *(int *)h;
    m->used = 5000000000ULL * (1 + *(int *)h);
    m->free = m->total - m->used; return 0;
}
"""


def test_ctypes_binding_against_a_compiled_fake_library(tmp_path):
    """The real CDLL path (argument passing, struct layouts) through a C library built with
    NVML's signatures, since CI machines have no NVIDIA driver."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fake NVML library")
    src, lib = tmp_path / "nvml.c", tmp_path / "libfake-nvml.so"
    src.write_text(FAKE_NVML_C)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    stats = GPUStats(lambda: ctypes.CDLL(str(lib)))
    assert stats.read() == [GPUSample(0, 0.81, 5_000_000_000, 150_754_820_096),
                            GPUSample(1, None, 10_000_000_000, 150_754_820_097)]
    stats.close()


def test_this_machine_scrapes_with_the_real_nvml_loader():
    """The default loader: on a machine without the NVIDIA driver the GPU series are absent
    and the scrape still succeeds; with one, every GPU reports its memory."""
    client = client_for(Metrics(MODEL))
    m = metrics_of(client)
    gpus = {dict(ls)["gpu"]: v for (n, ls), v in m.items()
            if n == "conveyor:gpu_memory_total_bytes"}
    if load_nvml() is None:
        assert gpus == {} and not any("gpu_" in n for n in names(m))
    else:
        assert gpus and all(v > 0 for v in gpus.values())


# ---- cost -----------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cost_series_follow_the_clock_and_the_usage():
    clock = Clock()
    metrics = Metrics(MODEL, vllm_names=True, cost_per_hour=3.6, clock=clock,
                      gpu_stats=GPUStats(lambda: None))
    client = client_for(metrics)
    clock.now += 1800  # half an hour, nothing served yet
    m = metrics_of(client)
    assert get(m, "conveyor:cost_usd_total") == 1.8
    assert get(m, "conveyor:cost_per_hour_usd") == 3.6
    assert not any("cost_per_1k" in n or "cost_per_10k" in n for n in names(m))

    for _ in range(2):  # 5 tokens each ("Hello")
        assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
    clock.now += 5400  # two hours in all
    m = metrics_of(client)
    for p in ("conveyor:", "vllm:"):
        assert get(m, p + "cost_usd_total") == 7.2
        assert get(m, p + "cost_per_1k_output_tokens_usd") == 720.0  # 7.2 USD / 10 tokens
        assert get(m, p + "cost_per_10k_requests_usd") == 36000.0  # 7.2 USD / 2 requests


def test_no_cost_series_without_the_flag():
    client = client_for(Metrics(MODEL, gpu_stats=GPUStats(lambda: None)))
    client.post("/v1/completions", json={"prompt": "hi"})
    assert not any("cost" in n for n in names(metrics_of(client)))


def test_cost_flag_parses_from_cli_and_env(capsys):
    assert build_parser().parse_args(["serve"]).cost_per_hour is None
    assert build_parser().parse_args(["serve", "--cost-per-hour", "2.5"]).cost_per_hour == 2.5
    args = parse_args(["serve"], environ={"CONVEYOR_COST_PER_HOUR": "4.25"})
    assert args.cost_per_hour == 4.25
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--cost-per-hour", bad])
        assert "cost per hour must be >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cost per hour must be >= 0"):
        Metrics(MODEL, cost_per_hour=-2.0)


def test_scrape_parses_after_everything_is_on():
    """All optional series together still form one valid exposition."""
    nvml = FakeNVML([(50, 1, 2)])
    client = client_for(Metrics(MODEL, vllm_names=True, cost_per_hour=1.0,
                                gpu_stats=GPUStats(lambda: nvml)))
    client.post("/v1/completions", json={"prompt": "hi"})
    text = client.get("/metrics").text
    m = scrape(text)
    assert get(m, "vllm:gpu_utilization_perc", gpu="0") == 0.5
    assert text.count("# TYPE conveyor:cost_usd_total counter") == 1
