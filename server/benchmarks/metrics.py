"""Per-request records and the report computed from them: pure functions, no I/O.

Definitions (all latencies of successful requests only):
- TTFT: request sent -> first chunk that carries output text.
- ITL: gaps between successive output chunks (a chunk may hold several tokens when the server
  holds text back, so ITL is per chunk, TPOT per token).
- TPOT: (E2E - TTFT) / (output tokens - 1), one value per request with two or more tokens.
- E2E latency: request sent -> stream ended.
- Goodput: successful requests per second that meet every given SLO; a request with a single
  output token has no TPOT and meets any TPOT SLO.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
                 "itl": "Inter-token latency", "e2el": "End-to-end latency"}


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds: `scheduled` and `start` from the
    benchmark's start, `end` likewise, `chunk_times` from this request's `start`."""

    index: int
    scheduled: float = 0.0
    start: float = 0.0
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int = 0
    expected_prompt_tokens: int | None = None
    expected_output_tokens: int | None = None
    success: bool = False
    error_type: str | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None

    @property
    def latency(self) -> float | None:
        return None if self.end is None else self.end - self.start

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / median (p50) / p90 / p99 / max in milliseconds; None for no values."""
    keys = ("mean", "median", "p90", "p99", "max")
    if not values_s:
        return dict.fromkeys(keys)
    ms = [v * 1000.0 for v in values_s]
    return {"mean": sum(ms) / len(ms), "median": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "max": max(ms)}


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput SLO {item!r}: expected ttft:MS, tpot:MS or e2el:MS")
        try:
            slos[name] = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number") from None
        if slos[name] <= 0:
            raise ValueError(f"goodput SLO {item!r} must be positive")
    return slos


def meets_slos(rec: RequestRecord, slos: dict[str, float]) -> bool:
    """Whether a successful request is within every SLO (milliseconds)."""
    values = {"ttft": rec.ttft, "tpot": rec.tpot, "e2el": rec.latency}
    for name, limit in slos.items():
        v = values[name]
        if v is None:
            if name == "tpot":
                continue  # one output token: nothing to time per token
            return False
        if v * 1000.0 > limit:
            return False
    return True


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """Most requests in flight at once (from start / end times)."""
    events = []
    for r in records:
        if r.end is not None:
            events += [(r.start, 1), (r.end, -1)]
    peak = cur = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # ends before starts on ties
        cur += delta
        peak = max(peak, cur)
    return peak


def summarize(records: Sequence[RequestRecord], duration: float,
              slos: dict[str, float] | None = None) -> dict:
    """The report: counts, throughputs over `duration` seconds, latency distributions."""
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    errors = Counter(r.error_type or "unknown" for r in failed)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error_type or "unknown", r.error or "")
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    report = {
        "completed": len(ok), "failed": len(failed), "errors": dict(sorted(errors.items())),
        "error_examples": examples, "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(ok)), "input_token_throughput": per_s(in_tokens),
        "output_token_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "peak_concurrency": peak_concurrency(records),
        "slos_ms": dict(slos or {}),
        "goodput": per_s(sum(meets_slos(r, slos) for r in ok)) if slos else None,
    }
    values = {
        "ttft": [r.ttft for r in ok if r.ttft is not None],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [g for r in ok for g in r.itl],
        "e2el": [r.latency for r in ok if r.latency is not None],
    }
    for name in LATENCY_METRICS:
        report[f"{name}_ms"] = distribution_ms(values[name])
    return report


def _fmt(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def format_report(report: dict, title: str = "Serving benchmark") -> str:
    """The report as a fixed-width table for the terminal."""
    w = 50
    lines = [f" {title} ".center(w, "="),
             f"{'Successful requests:':<36}{report['completed']:>14}",
             f"{'Failed requests:':<36}{report['failed']:>14}"]
    lines += [f"{'  ' + kind + ':':<36}{n:>14}" for kind, n in report["errors"].items()]
    rows = [("Duration (s):", report["duration_s"]),
            ("Total input tokens:", report["total_input_tokens"]),
            ("Total output tokens:", report["total_output_tokens"]),
            ("Request throughput (req/s):", report["request_throughput"]),
            ("Input token throughput (tok/s):", report["input_token_throughput"]),
            ("Output token throughput (tok/s):", report["output_token_throughput"]),
            ("Total token throughput (tok/s):", report["total_token_throughput"]),
            ("Peak concurrency:", report["peak_concurrency"])]
    if report.get("goodput") is not None:
        slos = " ".join(f"{k}:{v:g}" for k, v in report["slos_ms"].items())
        rows.append((f"Goodput (req/s) [{slos}]:", report["goodput"]))
    for label, v in rows:
        lines.append(f"{label:<36}{v if isinstance(v, int) else _fmt(v):>14}")
    for name in LATENCY_METRICS:
        d = report[f"{name}_ms"]
        lines.append(f" {METRIC_TITLES[name]} ".center(w, "-"))
        for key, label in (("mean", "Mean"), ("median", "Median (p50)"), ("p90", "P90"),
                           ("p99", "P99")):
            lines.append(f"{label + ' ' + name.upper() + ' (ms):':<36}{_fmt(d[key]):>14}")
    lines.append("=" * w)
    return "\n".join(lines)
