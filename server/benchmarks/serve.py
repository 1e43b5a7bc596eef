"""`conveyor bench serve` / `bench/serve.py`: load-test an OpenAI-compatible server.

Generates a workload, sends it at a request rate (gamma / Poisson arrivals) or with a
concurrency cap, records every request's chunk timestamps and prints TTFT / TPOT / ITL / E2E
latency, throughput and goodput. Works against Conveyor, vLLM, SGLang or anything that
streams OpenAI completions. Exit status: 0; 1 when the server cannot be reached, the workload
cannot be built or every request failed; 2 for invalid flags; 130 when interrupted (after
printing the partial report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from server.benchmarks import workloads as wl
from server.benchmarks.metrics import RequestRecord, format_report, parse_goodput, summarize
from server.benchmarks.results import print_ratios, rate_label, write_results

if TYPE_CHECKING:
    from server.benchmarks.client import ClientConfig

DATASETS = ("random", "sharegpt-synthetic", "prefix", "jsonl")


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not r > 0 for r in rates):  # also refuses nan
        raise ValueError(f"request rates must be positive numbers or inf, got {text!r}")
    return rates


def _vocab_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    try:
        pair = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI, got {text!r}") from None
    if not 0 <= pair[0] < pair[1]:
        raise argparse.ArgumentTypeError(f"need 0 <= LO < HI, got {text!r}")
    return pair


def add_args(p: argparse.ArgumentParser) -> None:
    """The load generator's flags (shared by bench/serve.py and `conveyor bench serve`)."""
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 is ignored)")
    s.add_argument("--endpoint", default="completions", choices=["completions", "chat"],
                   help="/v1/completions or /v1/chat/completions")
    s.add_argument("--model", help="model name to request (default: the first id listed by "
                                   "GET /v1/models)")
    # Read from the environment at run time, so --help never prints the secret.
    s.add_argument("--api-key", help="bearer token (default: $OPENAI_API_KEY)")
    s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json: random ids come "
                   "from its vocabulary minus special tokens, and chat prompts are decoded "
                   "with it (default: ids from --vocab-range; chat decodes via the server's "
                   "POST /detokenize)")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", default="random", choices=DATASETS,
                   help="random: uniform lengths; sharegpt-synthetic: ShareGPT-shaped "
                        "lognormal lengths (means ~200 in / 180 out); prefix: shared prefixes "
                        "+ unique suffixes; jsonl: --dataset-path")
    w.add_argument("--dataset-path", type=Path, help="JSONL file, one request per line: "
                   '{"prompt": "text" | [ids], "output_len"?: N} or {"messages": [...]}')
    w.add_argument("--num-prompts", type=int, default=100, help="requests to send (per rate)")
    w.add_argument("--input-len", type=int, default=256,
                   help="prompt tokens (random; the unique suffix for prefix)")
    w.add_argument("--output-len", type=int, default=128,
                   help="max_tokens per request (jsonl: where a line gives none)")
    w.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (random, prefix)")
    w.add_argument("--prefix-groups", type=int, default=4,
                   help="distinct shared prefixes (prefix dataset)")
    w.add_argument("--prefix-len", type=int, default=128,
                   help="tokens per shared prefix (prefix dataset)")
    w.add_argument("--vocab-range", type=_vocab_range, metavar="LO,HI",
                   help="draw random token ids from [LO, HI) (default: the tokenizer's "
                        "non-special ids, else [100, 1000), which fits small vocabularies)")
    w.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths, arrivals")
    a = p.add_argument_group("load")
    a.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second (inf = all at once)")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival times (1 = Poisson; <1 burstier)")
    a.add_argument("--max-concurrency", type=int,
                   help="most requests in flight (closed loop; combines with a rate)")
    a.add_argument("--sweep", metavar="R1,R2,...",
                   help="run the workload at each request rate in turn (overrides "
                        "--request-rate) and plot throughput against latency")
    r = p.add_argument_group("requests")
    r.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request makes exactly max_tokens "
                        "(--no-ignore-eos for servers that reject the field)")
    r.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    r.add_argument("--extra-body", type=json.loads, default={},
                   help="JSON object merged into every request body")
    r.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request counts as timed out")
    r.add_argument("--num-warmups", type=int, default=0,
                   help="requests (the workload's first ones) sent at once and not measured "
                        "before each run, to warm the server up")
    s.add_argument("--wait-ready", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for GET /health to answer 200 before starting")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", metavar="SLO", default=[],
                   help="SLOs in ms for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    o.add_argument("--result-file", type=Path,
                   help="write JSON (config, report, per-request records) here, and PNG "
                        "plots beside it")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return p


def _wait_ready(base: str, api_key: str | None, timeout_s: float) -> None:
    """Polls GET /health until it answers 200; ServerUnreachable after `timeout_s`."""
    import time

    import httpx

    from server.benchmarks.client import ServerUnreachable, get_json

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get_json(base, "/health", api_key, timeout=5.0, parse=False)
            return
        except (ServerUnreachable, httpx.HTTPStatusError) as exc:
            if time.monotonic() >= deadline:
                raise ServerUnreachable(f"not ready after {timeout_s:g} s: {exc}") from None
        time.sleep(0.5)


def _discover(base: str, api_key: str | None, model: str | None) -> tuple[str, int | None]:
    """(model id, its max_model_len when the server lists it)."""
    import httpx

    from server.benchmarks.client import get_json

    try:
        cards = get_json(base, "/v1/models", api_key).get("data") or []
    except httpx.HTTPStatusError as exc:
        if model is None:
            raise ValueError(f"GET /v1/models failed ({exc}); pass --model") from None
        cards = []
    if model is None:
        if not cards:
            raise ValueError("the server lists no models; pass --model")
        model = cards[0]["id"]
    mml = next((c.get("max_model_len") for c in cards if c.get("id") == model), None)
    return model, mml


def _build_workload(args: argparse.Namespace, tok: wl.TokenizerInfo | None,
                    max_model_len: int | None,
                    decode: Callable[[list[int]], str]) -> list[wl.RequestSpec]:
    pool = wl.token_pool(args.vocab_range, tok.vocab_size if tok else None,
                         tok.special_ids if tok else ())
    n = args.num_prompts
    if args.dataset == "random":
        specs = wl.random_workload(n, args.input_len, args.output_len, args.range_ratio, pool,
                                   args.seed)
    elif args.dataset == "sharegpt-synthetic":
        # Chat prompts are re-tokenized text inside a template: leave room in the context.
        growth, overhead = (1.5, 32) if args.endpoint == "chat" else (1.0, 0)
        specs = wl.sharegpt_synthetic_workload(n, pool, args.seed, max_model_len, growth,
                                               overhead)
    elif args.dataset == "prefix":
        specs = wl.prefix_workload(n, args.prefix_groups, args.prefix_len, args.input_len,
                                   args.output_len, args.range_ratio, pool, args.seed)
    else:
        if args.dataset_path is None:
            raise ValueError("--dataset jsonl needs --dataset-path")
        specs = wl.jsonl_workload(args.dataset_path, n, args.output_len)
    if args.endpoint == "chat":
        return wl.as_chat(specs, decode)
    if any(s.messages is not None for s in specs):
        raise ValueError("chat messages in the dataset need --endpoint chat")
    return specs


def _server_decoder(base: str, api_key: str | None,
                    model: str) -> Callable[[list[int]], str]:
    """Decodes token ids with the server's POST /detokenize (Conveyor, vLLM)."""
    import httpx

    from server.benchmarks.client import get_json

    def decode(ids: list[int]) -> str:
        try:
            return get_json(base, "/detokenize", api_key, "POST",
                            {"model": model, "tokens": ids})["prompt"]
        except httpx.HTTPStatusError as exc:
            raise ValueError(f"POST /detokenize failed ({exc}); chat prompts made of token "
                             "ids need --tokenizer") from None

    return decode


def run_rate(cfg: ClientConfig, specs: list[wl.RequestSpec], rate: float, args: argparse.Namespace,
             slos: dict[str, float]) -> tuple[list[RequestRecord], dict, bool]:
    """One load test at one rate: (records by index, report, interrupted)."""
    from tqdm import tqdm

    from server.benchmarks.client import run_requests

    offsets = wl.arrival_offsets(len(specs), rate, args.burstiness, args.seed)
    records: list[RequestRecord] = []
    bar = tqdm(total=len(specs), desc=f"rate {rate_label(rate)}", unit="req",
               disable=args.disable_tqdm)
    failed = 0

    def on_done(rec: RequestRecord) -> None:
        nonlocal failed
        failed += not rec.success
        bar.update(1)
        if failed:
            bar.set_postfix(failed=failed)

    interrupted = False
    try:
        if args.num_warmups > 0:
            warm = specs[:args.num_warmups]
            asyncio.run(run_requests(cfg, warm, [0.0] * len(warm), []))
        asyncio.run(run_requests(cfg, specs, offsets, records, args.max_concurrency, on_done))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
    records.sort(key=lambda r: r.index)
    duration = max((r.end for r in records if r.end is not None), default=0.0)
    report = summarize(records, duration, slos)
    report.update(request_rate=rate_label(rate), interrupted=interrupted,
                  num_prompts=len(specs))
    return records, report, interrupted


def run(args: argparse.Namespace) -> int:
    """Runs the load test described by parsed flags; returns the exit status."""
    try:
        from server.benchmarks.client import ClientConfig, ServerUnreachable, normalize_base_url
    except ImportError as exc:  # httpx is not a core dependency of the server
        print(f"error: the load generator needs httpx ({exc}); pip install httpx",
              file=sys.stderr)
        return 1
    try:
        slos = parse_goodput(args.goodput)
        rates = parse_rates(args.sweep) if args.sweep else [args.request_rate]
        if args.num_prompts < 1 or (args.max_concurrency is not None
                                    and args.max_concurrency < 1):
            raise ValueError("--num-prompts and --max-concurrency must be at least 1")
        if args.num_warmups < 0:
            raise ValueError("--num-warmups must not be negative")
        if not isinstance(args.extra_body, dict):
            raise ValueError("--extra-body must be a JSON object")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    base = normalize_base_url(args.base_url)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    try:
        if args.wait_ready > 0:
            _wait_ready(base, api_key, args.wait_ready)
        model, max_model_len = _discover(base, api_key, args.model)
        tok = wl.load_tokenizer(args.tokenizer) if args.tokenizer else None
        decode = tok.decode if tok else _server_decoder(base, api_key, model)
        specs = _build_workload(args, tok, max_model_len, decode)
    except (ServerUnreachable, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cfg = ClientConfig(base_url=base, model=model, endpoint=args.endpoint, api_key=api_key,
                       ignore_eos=args.ignore_eos, temperature=args.temperature,
                       timeout_s=args.request_timeout, extra_body=args.extra_body)
    print(f"{len(specs)} requests ({args.dataset}) to {base} model={model} "
          f"endpoint={args.endpoint} max_concurrency={args.max_concurrency}")
    runs: list[tuple[float, list, dict]] = []
    interrupted = False
    for rate in rates:
        records, report, interrupted = run_rate(cfg, specs, rate, args, slos)
        runs.append((rate, records, report))
        title = f"Serving benchmark @ {rate_label(rate)} req/s"
        print(format_report(report, title + (" (INTERRUPTED)" if interrupted else "")))
        for kind, msg in report["error_examples"].items():
            print(f"  first {kind} error: {msg[:300]}")
        if interrupted:
            break
    ratios = print_ratios([(rate, rep) for rate, _, rep in runs])
    if args.result_file is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                  if k not in ("api_key", "func")}
        config.update(model=model, base_url=base, max_model_len=max_model_len,
                      request_rate=rate_label(args.request_rate), rates=[
                          rate_label(r) for r in rates], interrupted=interrupted)
        for p in write_results(args.result_file, config, runs, ratios, bool(args.sweep)):
            print(f"wrote {p}")
    if interrupted:
        return 130
    return 1 if all(rep["completed"] == 0 for _, _, rep in runs) else 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
