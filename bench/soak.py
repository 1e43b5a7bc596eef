"""Soak test: thousands of random requests against one Conveyor server, then proof that
nothing leaked.

    python bench/soak.py --model /path/to/model --num-requests 2000 --concurrency 16 \\
        --server-args "--num-kv-blocks 512" --result-file /tmp/soak.json

Starts `conveyor serve` (or targets --base-url on this host), sends requests with random
sampling parameters over both OpenAI routes, streaming and not; a share of the streams is
dropped by the client after a few chunks and a share of the requests is invalid (bad
parameters, too-long prompts, malformed JSON, unknown model). Every valid, uncancelled
request must finish with a finish reason its parameters allow; every invalid one must get
its 4xx with an OpenAI-shaped body. Afterwards the engine must be empty (running, waiting
and KV cache usage 0 on /metrics) and the RSS of the server and engine processes, measured
idle after a warm-up and again at the end, must have grown by less than --max-rss-growth.
Writes a JSON result (and a PNG of RSS over the run); exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", help="soak this running server (on this host, so its RSS "
                   "can be read) instead of starting one")
    p.add_argument("--model", help="model directory for the server this tool starts "
                   "(default: the built-in demo model)")
    p.add_argument("--server-args", default="", help="extra `conveyor serve` flags, quoted, "
                   "e.g. \"--num-kv-blocks 512 --dtype float32\"")
    p.add_argument("--num-requests", type=int, default=2000, help="requests in all, warm-up "
                   "included (default 2000)")
    p.add_argument("--warmup", type=int, default=None, help="requests before the RSS "
                   "baseline is taken (default: a quarter of --num-requests; the engine "
                   "builds kernels for each new batch shape during the first few hundred)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--cancel-frac", type=float, default=0.2, help="share of requests that "
                   "are streams the client drops mid-way (default 0.2)")
    p.add_argument("--invalid-frac", type=float, default=0.1, help="share of requests that "
                   "are invalid and must get a 4xx (default 0.1)")
    p.add_argument("--max-tokens", type=int, default=32, help="upper bound of the random "
                   "max_tokens of valid requests (default 32)")
    p.add_argument("--max-rss-growth", type=float, default=0.05, help="allowed RSS growth "
                   "of each process from the baseline to the end (default 0.05 = 5%%)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds to wait for "
                   "the engine to be empty after the load")
    p.add_argument("--seed", type=int, default=0, help="seed of the random workload")
    p.add_argument("--result-file", default="soak.json", help="JSON result path")
    p.add_argument("--plot", default=None, help="PNG of RSS over the run (default: the "
                   "result file with .png; 'none' for no plot)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---- the server and its processes ---------------------------------------------------------

class StartedServer:
    """`python -m server serve` on a free loopback port, its log in a temporary file."""

    def __init__(self, model: str | None, server_args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix="soak-server-", suffix=".log")
        cmd = [sys.executable, "-m", "server", "serve", "--port", str(port)]
        cmd += ["--model", model] if model else []
        self.proc = subprocess.Popen(cmd + shlex.split(server_args), cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 300.0) -> None:
        from server.benchmarks.process import wait_healthy

        try:
            wait_healthy(self.base_url, self.proc, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise type(exc)(f"{exc}:\n{self.tail()}") from exc

    def tail(self, n: int = 20) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text().splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (a drain), then the exit code; killed if it does not exit in time."""
        from server.benchmarks.process import stop_process

        code = stop_process(self.proc, timeout)
        self.log.close()
        return code


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process on this host (None when it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def parent_pid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


# ---- scraping ----------------------------------------------------------------------------

async def engine_gauges(client: Any) -> dict[str, float]:
    """conveyor:num_requests_running / _waiting / kv_cache_usage_perc from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = (await client.get("/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("conveyor:")
        if family.name.startswith("conveyor:") and name in GAUGES:
            found[name] = sum(s.value for s in family.samples)
    return found


async def wait_idle(client: Any, timeout: float) -> dict[str, float]:
    """Polls until the engine is empty (cancelled streams abort asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        gauges = await engine_gauges(client)
        if all(gauges.get(g, -1.0) == 0.0 for g in GAUGES) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.2)


# ---- the run -----------------------------------------------------------------------------

async def run_phase(client: Any, cases: list, concurrency: int, bar: Any,
                    on_done: Any) -> list:
    from bench.soak_cases import run_case

    queue: asyncio.Queue = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)
    outcomes: list = []

    async def worker() -> None:
        while not queue.empty():
            outcome = await run_case(client, queue.get_nowait())
            outcomes.append(outcome)
            bar.update(1)
            on_done()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


async def soak(args: argparse.Namespace, base_url: str) -> dict[str, Any]:
    import httpx
    from tqdm.auto import tqdm

    from bench.soak_cases import make_cases

    limits = httpx.Limits(max_connections=args.concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        card = (await client.get("/v1/models")).json()["data"][0]
        model, max_model_len = card["id"], int(card.get("max_model_len") or 2048)
        engine_pid = int((await client.get("/internal/stats")).json()["engine_pid"])
        pids = {"server": parent_pid(engine_pid), "engine": engine_pid}
        cases = make_cases(args.num_requests, random.Random(args.seed), model, max_model_len,
                           args.max_tokens, args.cancel_frac, args.invalid_frac)
        warmup = args.warmup if args.warmup is not None else max(1, args.num_requests // 4)
        samples: list[dict[str, Any]] = []
        done = 0

        def sample() -> None:
            nonlocal done
            done += 1
            if done % 10 == 0 or done == len(cases):
                samples.append({"done": done, **{k: rss_bytes(p) if p else None
                                                 for k, p in pids.items()}})

        t0 = time.perf_counter()
        bar = tqdm(total=len(cases), desc="soak", unit="req", disable=args.no_progress)
        try:
            outcomes = await run_phase(client, cases[:warmup], args.concurrency, bar, sample)
            idle_after_warmup = await wait_idle(client, args.drain_timeout)
            before = {k: rss_bytes(p) if p else None for k, p in pids.items()}
            outcomes += await run_phase(client, cases[warmup:], args.concurrency, bar, sample)
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        gauges = await wait_idle(client, args.drain_timeout)
        after = {k: rss_bytes(p) if p else None for k, p in pids.items()}
    return report(args, outcomes, idle_after_warmup, gauges, before, after, samples,
                  warmup, elapsed, model)


def report(args: argparse.Namespace, outcomes: list, idle_after_warmup: dict,
           gauges: dict, before: dict, after: dict, samples: list, warmup: int,
           elapsed: float, model: str) -> dict[str, Any]:
    failures = [o for o in outcomes if not o.ok]
    kinds = Counter(o.kind for o in outcomes)
    problems: list[str] = []
    if failures:
        problems.append(f"{len(failures)} request(s) did not get what they should")
    leftover = {g: v for g, v in gauges.items() if v != 0.0}
    if leftover or set(gauges) != set(GAUGES):
        problems.append(f"engine not empty after the load: {gauges}")
    rss: dict[str, Any] = {}
    for proc in ("server", "engine"):
        b, a = before.get(proc), after.get(proc)
        growth = (a - b) / b if a and b else None
        rss[proc] = {"before_bytes": b, "after_bytes": a, "growth": growth}
        if growth is None:
            problems.append(f"RSS of the {proc} process could not be read")
        elif growth >= args.max_rss_growth:
            problems.append(f"{proc} RSS grew {growth:.1%} (limit {args.max_rss_growth:.0%})")
    finish = Counter(r for o in outcomes if o.kind == "valid" for r in o.finish_reasons)
    return {
        "model": model, "num_requests": len(outcomes), "warmup": warmup,
        "concurrency": args.concurrency, "seed": args.seed,
        "kinds": dict(kinds), "ok": {k: sum(o.ok for o in outcomes if o.kind == k)
                                     for k in kinds},
        "finish_reasons": dict(finish),
        "statuses": dict(Counter(str(o.status) for o in outcomes)),
        "failures": [vars(o) for o in failures[:50]],
        "engine_after_warmup": idle_after_warmup, "engine_after": gauges,
        "rss": rss, "rss_samples": samples, "duration_s": elapsed,
        "requests_per_s": len(outcomes) / elapsed if elapsed else None,
        "problems": problems, "passed": not problems,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    samples = result["rss_samples"]
    for proc in ("server", "engine"):
        pts = [(s["done"], s[proc] / 2**20) for s in samples if s.get(proc)]
        if pts:
            ax.plot(*zip(*pts), label=f"{proc} RSS")
    ax.axvline(result["warmup"], color="grey", linestyle="--", label="baseline (warm-up end)")
    ax.set_xlabel("requests done")
    ax.set_ylabel("MiB")
    ax.set_title(f"soak: {result['num_requests']} requests, "
                 f"{'passed' if result['passed'] else 'FAILED'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    lines = [f"soak of {result['model']}: {result['num_requests']} requests in "
             f"{result['duration_s']:.1f} s ({result['requests_per_s']:.1f} req/s)"]
    for kind, n in sorted(result["kinds"].items()):
        lines.append(f"  {kind:8s} {result['ok'][kind]}/{n} as expected")
    lines.append(f"  finish reasons of valid requests: {result['finish_reasons']}")
    lines.append(f"  engine after the load: {result['engine_after']}")
    for proc, r in result["rss"].items():
        if r["growth"] is not None:
            lines.append(f"  {proc} RSS {r['before_bytes'] / 2**20:.1f} -> "
                         f"{r['after_bytes'] / 2**20:.1f} MiB ({r['growth']:+.2%})")
    for f in result["failures"][:10]:
        lines.append(f"  FAILED #{f['index']} {f['kind']}: {f['problem']}")
    lines += [f"  PROBLEM: {p}" for p in result["problems"]]
    lines.append("PASSED" if result["passed"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if str(ROOT) not in sys.path:  # run as a script from a checkout
        sys.path.insert(0, str(ROOT))
    args = build_parser().parse_args(argv)
    server = None
    if args.base_url:
        base_url = args.base_url.rstrip("/").removesuffix("/v1")
    else:
        server = StartedServer(args.model, args.server_args)
        base_url = server.base_url
    try:
        if server is not None:
            server.wait_healthy()
        result = asyncio.run(soak(args, base_url))
    finally:
        exit_code = server.stop() if server is not None else None
    if server is not None:
        result["server_exit_code"] = exit_code
        if exit_code != 0:
            result["problems"].append(f"the server exited {exit_code} on SIGTERM, not 0")
            result["passed"] = False
    out = Path(args.result_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.plot != "none":
        plot(result, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(summary(result))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
