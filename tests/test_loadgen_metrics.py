"""The load generator without a server: metrics math on synthetic timestamps, workloads and
arrivals from seeds, the SSE client against a mock transport, and the command line."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from server.benchmarks import workloads as wl
from server.benchmarks.client import (
    ClientConfig,
    build_payload,
    chunk_text,
    normalize_base_url,
    send_request,
)
from server.benchmarks.metrics import (
    RequestRecord,
    format_report,
    meets_slos,
    parse_goodput,
    peak_concurrency,
    percentile,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent


def _ok(i: int, start: float, chunks: list[float], end: float, out: int,
        prompt: int = 10) -> RequestRecord:
    return RequestRecord(index=i, start=start, end=end, chunk_times=chunks, prompt_tokens=prompt,
                         output_tokens=out, success=True)


# ---- metrics ---------------------------------------------------------------------------


def test_record_latencies_from_timestamps():
    r = _ok(0, 1.0, [0.2, 0.3, 0.6], 1.9, out=5)
    assert r.ttft == 0.2
    assert r.latency == pytest.approx(0.9)
    assert r.itl == pytest.approx([0.1, 0.3])
    assert r.tpot == pytest.approx((0.9 - 0.2) / 4)  # per token, chunks may hold several
    assert _ok(1, 0.0, [0.5], 0.5, out=1).tpot is None
    assert RequestRecord(index=2).ttft is None and RequestRecord(index=2).latency is None


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20, 30, 40, 50], 90) == pytest.approx(46.0)
    xs = [0.3, 7.0, 1.5, 2.25, 9.75, 4.0, 0.1]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        percentile([], 50)


def _records() -> list[RequestRecord]:
    return [
        _ok(0, 0.0, [0.1, 0.2, 0.3], 0.5, out=5, prompt=10),   # tpot 0.1
        _ok(1, 0.5, [0.2, 0.4], 1.0, out=3, prompt=20),        # tpot 0.15
        _ok(2, 1.0, [0.4], 2.0, out=1, prompt=30),             # no tpot
        RequestRecord(index=3, start=1.2, end=1.3, error_type="http_500", error="boom"),
        RequestRecord(index=4, start=1.5, end=3.5, error_type="timeout", error="late"),
    ]


def test_summary_exact_values():
    rep = summarize(_records(), duration=4.0, slos={"ttft": 250.0, "tpot": 120.0})
    assert (rep["completed"], rep["failed"]) == (3, 2)
    assert rep["errors"] == {"http_500": 1, "timeout": 1}
    assert rep["error_examples"] == {"http_500": "boom", "timeout": "late"}
    assert (rep["total_input_tokens"], rep["total_output_tokens"]) == (60, 9)
    assert rep["request_throughput"] == pytest.approx(3 / 4)
    assert rep["input_token_throughput"] == pytest.approx(15.0)
    assert rep["output_token_throughput"] == pytest.approx(2.25)
    assert rep["total_token_throughput"] == pytest.approx(69 / 4)
    ttft = rep["ttft_ms"]
    assert ttft["mean"] == pytest.approx(700 / 3)
    assert ttft["median"] == pytest.approx(200.0)
    assert ttft["p90"] == pytest.approx(360.0)
    assert ttft["p99"] == pytest.approx(396.0)
    assert ttft["max"] == pytest.approx(400.0)
    assert rep["tpot_ms"]["mean"] == pytest.approx(125.0)
    assert rep["tpot_ms"]["median"] == pytest.approx(125.0)
    assert rep["tpot_ms"]["p99"] == pytest.approx(149.5)
    # ITL: the gaps of all successful requests: 100, 100 (req 0), 200 (req 1).
    assert rep["itl_ms"]["mean"] == pytest.approx(400 / 3)
    assert rep["itl_ms"]["median"] == pytest.approx(100.0)
    assert rep["e2el_ms"]["mean"] == pytest.approx(2000 / 3)
    assert rep["e2el_ms"]["median"] == pytest.approx(500.0)
    # Goodput: req 0 meets both SLOs, req 1 misses tpot (150 > 120), req 2 misses ttft
    # (400 > 250); the single-token request's missing TPOT does not count against it.
    assert rep["goodput"] == pytest.approx(1 / 4)
    assert rep["peak_concurrency"] == 2  # request 2 overlaps 3, then 4


def test_summary_without_successes_or_slos():
    rep = summarize(_records()[3:], duration=2.0)
    assert rep["completed"] == 0 and rep["goodput"] is None
    assert rep["ttft_ms"] == dict.fromkeys(("mean", "median", "p90", "p99", "max"))
    assert rep["output_token_throughput"] == 0.0
    assert summarize([], duration=0.0)["request_throughput"] == 0.0
    table = format_report(summarize(_records(), 4.0, {"e2el": 600.0}))
    assert "http_500:" in table and "Goodput (req/s) [e2el:600]" in table
    assert "n/a" in format_report(rep)


def test_goodput_slos():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:2000"]) == {
        "ttft": 500.0, "tpot": 50.5, "e2el": 2000.0}
    for bad in (["ttft"], ["itl:5"], ["tpot:x"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    one_token = _ok(0, 0.0, [0.3], 0.3, out=1)
    assert meets_slos(one_token, {"tpot": 1.0, "ttft": 300.0})
    assert not meets_slos(one_token, {"ttft": 299.0})
    assert not meets_slos(one_token, {"e2el": 299.0})


def test_peak_concurrency_counts_overlaps():
    recs = [_ok(i, s, [0.1], e, 1) for i, (s, e) in enumerate([(0, 2), (1, 3), (2, 4), (5, 6)])]
    assert peak_concurrency(recs) == 2  # an end and a start at t=2 do not overlap


# ---- workloads ---------------------------------------------------------------------------


def test_token_pool_excludes_specials_and_clips_to_vocab():
    assert wl.token_pool(None) == list(range(100, 1000))
    assert wl.token_pool((5, 10), vocab_size=8, special_ids=[6]) == [5, 7]
    assert wl.token_pool(None, vocab_size=6, special_ids=[0, 1, 2]) == [3, 4, 5]
    with pytest.raises(ValueError):
        wl.token_pool((5, 10), special_ids=range(5, 10))


def test_random_workload_exact_lengths_and_seeded():
    pool = wl.token_pool((100, 200))
    specs = wl.random_workload(20, 64, 16, 0.0, pool, seed=1)
    assert all(len(s.prompt) == s.prompt_len == 64 and s.output_len == 16 for s in specs)
    assert all(100 <= t < 200 for s in specs for t in s.prompt)
    ranged = wl.random_workload(200, 100, 50, 0.5, pool, seed=1)
    assert {len(s.prompt) for s in ranged} <= set(range(50, 151))
    assert all(s.prompt_len == len(s.prompt) for s in ranged)
    assert {s.output_len for s in ranged} <= set(range(25, 76))
    assert min(s.prompt_len for s in ranged) < 60 and max(s.prompt_len for s in ranged) > 140
    assert wl.random_workload(20, 64, 16, 0.0, pool, seed=1) == specs
    assert wl.random_workload(20, 64, 16, 0.0, pool, seed=2) != specs
    with pytest.raises(ValueError):
        wl.random_workload(1, 64, 16, 1.0, pool, seed=1)


def test_prefix_workload_shares_prefixes():
    pool = wl.token_pool(None)
    specs = wl.prefix_workload(6, 2, 32, 8, 4, 0.0, pool, seed=0)
    assert all(s.prompt_len == len(s.prompt) == 40 for s in specs)
    heads = [tuple(s.prompt[:32]) for s in specs]
    assert heads[0] == heads[2] == heads[4] != heads[1] == heads[3] == heads[5]
    assert len({tuple(s.prompt[32:]) for s in specs}) == 6


def test_sharegpt_synthetic_lengths():
    pairs = wl.sharegpt_lengths(20000, seed=0)
    ins, outs = [p[0] for p in pairs], [p[1] for p in pairs]
    assert statistics.mean(ins) == pytest.approx(wl.SHAREGPT_INPUT_MEAN, rel=0.1)
    assert statistics.mean(outs) == pytest.approx(wl.SHAREGPT_OUTPUT_MEAN, rel=0.1)
    assert min(ins + outs) >= wl.SHAREGPT_MIN_LEN and max(ins + outs) <= wl.SHAREGPT_MAX_LEN
    assert statistics.median(ins) < statistics.mean(ins)  # right-skewed like real chats
    fitted = wl.sharegpt_lengths(2000, seed=0, max_model_len=256)
    assert all(i <= 128 and o >= 1 and i + o <= 256 for i, o in fitted)
    assert max(i + o for i, o in fitted) == 256
    chat = wl.sharegpt_lengths(2000, seed=0, max_model_len=256, prompt_growth=1.5,
                               prompt_overhead=32)
    assert [i for i, _ in chat] == [i for i, _ in fitted]
    assert all(math.ceil(i * 1.5) + 32 + o <= 256 or o == 1 for i, o in chat)
    specs = wl.sharegpt_synthetic_workload(50, wl.token_pool(None), seed=3)
    assert [(s.prompt_len, s.output_len) for s in specs] == wl.sharegpt_lengths(50, seed=3)
    assert all(len(s.prompt) == s.prompt_len for s in specs)


def test_jsonl_workload(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hi", "output_len": 7}\n\n{"prompt": [5, 6, 7]}\n'
                 '{"messages": [{"role": "user", "content": "yo"}], "output_len": 3}\n')
    specs = wl.jsonl_workload(f, 5, default_output_len=11)
    assert [s.output_len for s in specs] == [7, 11, 3, 7, 11]
    assert specs[0].prompt == "hi" and specs[0].prompt_len is None
    assert specs[1].prompt == [5, 6, 7] and specs[1].prompt_len == 3
    assert specs[2].messages == [{"role": "user", "content": "yo"}]
    chat = wl.as_chat(specs[:3], decode=lambda ids: "-".join(map(str, ids)))
    assert [s.messages[0]["content"] for s in chat] == ["hi", "5-6-7", "yo"]
    assert all(s.prompt is None and s.prompt_len is None for s in chat)
    with pytest.raises(ValueError):
        wl.as_chat(specs[1:2], decode=None)
    for bad in ('{"prompt": ""}', '{"output_len": 3}', '[1]', '{"prompt": "x", '
                '"output_len": 0}', "not json"):
        f.write_text(bad + "\n")
        with pytest.raises(ValueError, match="d.jsonl:1"):
            wl.jsonl_workload(f, 1, 4)


def test_poisson_and_gamma_arrivals():
    n, rate = 100_000, 4.0
    for shape in (1.0, 0.5, 4.0):
        gaps = wl.inter_arrival_gaps(n, rate, shape, seed=7)
        assert gaps == wl.inter_arrival_gaps(n, rate, shape, seed=7)
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / rate, rel=0.02)
        # gamma(k): coefficient of variation 1/sqrt(k); Poisson (k = 1) has CV 1.
        cv = statistics.pstdev(gaps) / mean
        assert cv == pytest.approx(1 / math.sqrt(shape), rel=0.05)
    assert wl.inter_arrival_gaps(3, rate, 1.0, seed=1) != wl.inter_arrival_gaps(3, rate, 1.0, 2)
    assert wl.inter_arrival_gaps(3, math.inf, 1.0, seed=1) == [0.0, 0.0, 0.0]
    offsets = wl.arrival_offsets(4, 2.0, 1.0, seed=3)
    gaps = wl.inter_arrival_gaps(3, 2.0, 1.0, seed=3)
    assert offsets == pytest.approx([0.0, gaps[0], gaps[0] + gaps[1], sum(gaps)])
    assert wl.arrival_offsets(0, 2.0, 1.0, 0) == [] and wl.arrival_offsets(1, 2.0, 1.0, 0) == [0]
    with pytest.raises(ValueError):
        wl.inter_arrival_gaps(3, 0.0, 1.0, seed=1)


# ---- client --------------------------------------------------------------------------------


def test_payloads_and_chunk_text():
    cfg = ClientConfig(base_url="http://x", model="m", extra_body={"top_k": 5})
    spec = wl.RequestSpec(8, prompt=[1, 2, 3], prompt_len=3)
    body = build_payload(spec, cfg)
    assert body == {"model": "m", "prompt": [1, 2, 3], "max_tokens": 8, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True},
                    "ignore_eos": True, "top_k": 5}
    chat = ClientConfig(base_url="http://x", model="m", endpoint="chat", ignore_eos=False)
    msgs = [{"role": "user", "content": "hi"}]
    body = build_payload(wl.RequestSpec(4, messages=msgs), chat)
    assert body["messages"] == msgs and "ignore_eos" not in body and "prompt" not in body
    with pytest.raises(ValueError):
        build_payload(spec, chat)
    assert chunk_text({"choices": [{"text": "ab"}]}) == "ab"
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [{"delta": {"content": "c"}}]}) == "c"
    assert chunk_text({"choices": [], "usage": {}}) == ""
    assert normalize_base_url("http://h:1/v1/") == normalize_base_url("http://h:1") == "http://h:1"


def _sse(*objs) -> bytes:
    return b"".join(b"data: " + (o if isinstance(o, bytes) else json.dumps(o).encode())
                    + b"\n\n" for o in objs)


def _send(handler, endpoint: str = "completions", timeout_s: float = 5.0) -> RequestRecord:
    cfg = ClientConfig(base_url="http://test", model="m", endpoint=endpoint, timeout_s=timeout_s)
    spec = wl.RequestSpec(3, prompt=[1, 2], prompt_len=2, messages=[{"role": "user"}])

    async def go() -> RequestRecord:
        async with httpx.AsyncClient(base_url="http://test",
                                     transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, cfg, spec, RequestRecord(index=0), 0.0)

    return asyncio.run(go())


def test_client_reads_stream_usage_and_chunk_times():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["path"], seen["body"] = request.url.path, json.loads(request.content)
        return httpx.Response(200, content=_sse(
            {"choices": [{"text": "a"}]}, {"choices": [{"text": ""}]},
            {"choices": [{"text": "bc", "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 3}}, b"[DONE]"))

    rec = _send(handler)
    assert seen["path"] == "/v1/completions" and seen["body"]["prompt"] == [1, 2]
    assert rec.success and rec.error_type is None
    assert (rec.prompt_tokens, rec.output_tokens) == (2, 3)
    assert len(rec.chunk_times) == 2  # the empty chunk carries no output
    assert rec.chunk_times == sorted(rec.chunk_times) and rec.end >= rec.start


def test_client_counts_chunks_without_usage():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_sse(
            {"choices": [{"delta": {"role": "assistant"}}]},
            *[{"choices": [{"delta": {"content": c}}]} for c in "xyz"], b"[DONE]"))

    rec = _send(handler, endpoint="chat")
    assert rec.success and rec.prompt_tokens is None and rec.output_tokens == 3


@pytest.mark.parametrize("handler, kind, message", [
    (lambda r: httpx.Response(429, json={"error": {"message": "slow down"}}), "http_429",
     "slow down"),
    (lambda r: httpx.Response(500, text="oops"), "http_500", "oops"),
    (lambda r: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]},
                                                {"error": {"message": "engine died"}})),
     "stream_error", "engine died"),
    (lambda r: httpx.Response(200, content=b"data: {nope\n\n"), "protocol", "not JSON"),
])
def test_client_error_types(handler, kind, message):
    rec = _send(handler)
    assert not rec.success and rec.error_type == kind and message in rec.error


def test_client_connection_error_and_timeout():
    def refuse(request):
        raise httpx.ConnectError("refused")

    rec = _send(refuse)
    assert (rec.success, rec.error_type) == (False, "connection")

    async def slow_stream():
        yield b'data: {"choices": [{"text": "a"}]}\n\n'
        await asyncio.sleep(10)
        yield b"data: [DONE]\n\n"

    rec = _send(lambda r: httpx.Response(200, content=slow_stream()), timeout_s=0.2)
    assert (rec.success, rec.error_type, len(rec.chunk_times)) == (False, "timeout", 1)


# ---- command line --------------------------------------------------------------------------


def test_bench_serve_cli_flags_all_documented():
    from server.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "serve", "--sweep", "1,inf", "--goodput", "ttft:5",
                              "--vocab-range", "3,50", "--max-concurrency", "4"])
    assert (args.sweep, args.goodput, args.vocab_range, args.max_concurrency) == (
        "1,inf", ["ttft:5"], (3, 50), 4)
    assert math.isinf(args.request_rate) and args.ignore_eos is True
    bench = parser._subparsers._group_actions[0].choices["bench"]  # noqa: SLF001
    serve = bench._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001
    assert all(a.help for a in serve._actions)  # noqa: SLF001
    assert parser.parse_args(["serve"]).port == 8000  # the server's flags are untouched


def test_loadgen_modules_never_import_torch():
    code = ("import sys\nimport server.benchmarks.serve, server.benchmarks.client, "
            "server.benchmarks.plots, server.benchmarks.workloads\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "False"


def test_unreachable_server_is_a_clear_error(capsys):
    from server.benchmarks.serve import main
    from tests.server_process import free_port

    rc = main(["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2",
               "--disable-tqdm"])
    assert rc == 1
    assert "cannot reach" in capsys.readouterr().err
