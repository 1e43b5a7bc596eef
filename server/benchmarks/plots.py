"""PNG plots of a load test: latency CDFs, and throughput against latency across a rate sweep.

matplotlib is imported inside the functions (Agg backend): it is only needed when a result
file is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from server.benchmarks.metrics import LATENCY_METRICS, METRIC_TITLES, RequestRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_values_ms(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per metric, the successful requests' values in ms (ITL: every chunk gap)."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft * 1e3 for r in ok if r.ttft is not None],
        "tpot": [r.tpot * 1e3 for r in ok if r.tpot is not None],
        "itl": [g * 1e3 for r in ok for g in r.itl],
        "e2el": [r.latency * 1e3 for r in ok if r.latency is not None],
    }


def plot_latency_cdfs(runs: Sequence[tuple[str, Sequence[RequestRecord]]], path: Path) -> None:
    """One panel per latency metric, one CDF line per run (label, records)."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, name in zip(axes.flat, LATENCY_METRICS):
        for label, records in runs:
            xs = sorted(latency_values_ms(records)[name])
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=label)
        ax.set_title(METRIC_TITLES[name])
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "itl" else "fraction of chunk gaps")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(points: Sequence[tuple[str, dict]], path: Path) -> None:
    """Output throughput against p50 / p99 TPOT and TTFT, one point per (rate label, report)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    tput = [rep["output_token_throughput"] for _, rep in points]
    for ax, name in zip(axes, ("tpot", "ttft")):
        for q, style in (("median", "o-"), ("p99", "s--")):
            ys = [rep[f"{name}_ms"][q] for _, rep in points]
            pairs = [(x, y) for x, y in zip(tput, ys) if y is not None]
            if pairs:
                ax.plot(*zip(*pairs), style, label=f"{'p50' if q == 'median' else q}")
        for (label, rep), x in zip(points, tput):
            y = rep[f"{name}_ms"]["median"]
            if y is not None:
                ax.annotate(f"{label} req/s", (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(f"{name.upper()} (ms)")
        ax.set_title(f"Throughput vs {name.upper()}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
