"""HTTP server throughput vs the offline engine, same model and workload, one script.

Starts `conveyor serve` on a free loopback port, sends the offline benchmark's 32 prompts
(token ids, 128 output tokens each, ignore_eos, greedy) as 32 concurrent completions,
streaming and not, then runs the same workload through the offline LLM; prints the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_model import build_bench_model  # noqa: E402
from bench.offline_throughput import make_prompts  # noqa: E402


async def _run_http(base_url: str, prompts: list[list[int]], max_tokens: int,
                    stream: bool = True) -> dict:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def one(p: list[int]) -> int:
            body = {"prompt": p, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": stream}
            if not stream:
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
            body["stream_options"] = {"include_usage": True}
            n = 0
            async with client.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    # Only the last chunk carries usage; parse nothing else (the client
                    # shares the cores with the server).
                    if line.startswith('data: {') and '"usage":{' in line:
                        n = json.loads(line[6:])["usage"]["completion_tokens"]
            return n

        t0 = time.perf_counter()
        counts = await asyncio.gather(*[one(p) for p in prompts])
        elapsed = time.perf_counter() - t0
    name = "http-stream" if stream else "http"
    return {"engine": name, "seconds": elapsed, "output_tokens": sum(counts),
            "output_tok_per_s": sum(counts) / elapsed}


def _best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["output_tok_per_s"])


def run_http(model_dir: Path, prompts, max_tokens: int, repeat: int) -> list[dict]:
    """Streaming and non-streaming, best of `repeat` each, after one untimed warm-up run
    (prefix caching off, so repeats recompute everything)."""
    from tests.server_process import running_server

    with running_server(model_dir, "--dtype", "bfloat16", "--kv-cache-memory",
                        str(1 << 30), "--no-enable-prefix-caching") as server:
        asyncio.run(_run_http(server.base_url, prompts, max_tokens, False))
        return [_best([asyncio.run(_run_http(server.base_url, prompts, max_tokens, stream))
                       for _ in range(repeat)]) for stream in (True, False)]


def run_offline(model_dir: Path, prompts, max_tokens: int, repeat: int) -> dict:
    from server import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype="bfloat16", kv_cache_memory=1 << 30,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(batch, params, use_tqdm=False)  # warm-up, as for the server
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        runs.append({"engine": "offline", "seconds": elapsed, "output_tokens": n,
                     "output_tok_per_s": n / elapsed})
    return _best(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) /
                    "conveyor-bench-llama-110m", help="where the benchmark model is built/reused")
    ap.add_argument("--num-prompts", type=int, default=32, help="concurrent requests")
    ap.add_argument("--output-len", type=int, default=128, help="tokens per request")
    ap.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    ap.add_argument("--repeat", type=int, default=2,
                    help="timed runs per mode after a warm-up run; the best is reported")
    ap.add_argument("--result-file", type=Path, default=Path("bench/results/serve.json"),
                    help="JSON output")
    args = ap.parse_args()
    model_dir = build_bench_model(args.model_dir)
    prompts = make_prompts(args.num_prompts, 32, 256, args.seed)
    http = run_http(model_dir, prompts, args.output_len, args.repeat)
    offline = run_offline(model_dir, prompts, args.output_len, args.repeat)
    for r in (*http, offline):
        print(f"{r['engine']:>12}: {r['output_tok_per_s']:8.1f} output tok/s "
              f"({r['output_tokens']} tokens in {r['seconds']:.1f} s)")
    ratios = {r["engine"]: r["output_tok_per_s"] / offline["output_tok_per_s"] for r in http}
    for name, ratio in ratios.items():
        print(f"{name} / offline = {ratio:.2f}")
    print("(client, front end and engine share this machine's cores; the client's own CPU "
          "time is part of what HTTP costs here)")
    args.result_file.parent.mkdir(parents=True, exist_ok=True)
    args.result_file.write_text(json.dumps({"http": http, "offline": offline,
                                            "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
