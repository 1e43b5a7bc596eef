"""What a load test leaves behind: ratios against a baseline from the same run, the JSON
result file and the PNG plots beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def print_ratios(runs: list[tuple[float, dict]]) -> dict:
    """Ratios against a baseline from the same run: achieved vs offered rate, and in a sweep
    each rate's throughput and latency against the first rate's."""
    ratios: dict = {}
    for rate, rep in runs:
        if not math.isinf(rate) and rep["completed"]:
            ratios[f"achieved_vs_offered_rate@{rate_label(rate)}"] = (
                rep["request_throughput"] / rate)
    if len(runs) > 1:
        base = runs[0][1]
        print(f"{'rate':>8} {'req/s':>8} {'out tok/s':>10} {'x tput':>7} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'x TPOT99':>8}")
        for rate, rep in runs:
            x_tput = (rep["output_token_throughput"] / base["output_token_throughput"]
                      if base["output_token_throughput"] else None)
            b99, r99 = base["tpot_ms"]["p99"], rep["tpot_ms"]["p99"]
            x_tpot = r99 / b99 if b99 and r99 is not None else None
            ratios[f"throughput_vs_first@{rate_label(rate)}"] = x_tput
            ratios[f"tpot_p99_vs_first@{rate_label(rate)}"] = x_tpot
            cells = [_fmt(rep["request_throughput"], 2), _fmt(rep["output_token_throughput"]),
                     _fmt(x_tput, 2), _fmt(rep["ttft_ms"]["median"]), _fmt(rep["ttft_ms"]["p99"]),
                     _fmt(rep["tpot_ms"]["median"]), _fmt(rep["tpot_ms"]["p99"]),
                     _fmt(x_tpot, 2)]
            widths = (8, 10, 7, 9, 9, 9, 9, 8)
            print(f"{rate_label(rate):>8} " + " ".join(c.rjust(w) for c, w in zip(cells, widths)))
    for name, v in ratios.items():
        if v is not None and "vs_first" not in name:
            print(f"{name}: {v:.2f}")
    return ratios


def write_results(path: Path, config: dict, runs: list[tuple[float, list, dict]],
                  ratios: dict, sweep: bool) -> list[Path]:
    """The JSON (config, ratios, and per rate the report and per-request records) and the
    PNGs beside it: `<stem>_latency_cdf.png`, and `<stem>_sweep.png` for a sweep."""
    from server.benchmarks.plots import plot_latency_cdfs, plot_sweep

    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [{"request_rate": rate_label(rate), "report": rep,
                "records": [r.to_dict() for r in recs]} for rate, recs, rep in runs]
    data = {"config": config, "ratios": ratios}
    data.update({"sweep": entries} if sweep else entries[0])
    path.write_text(json.dumps(data, indent=1))
    cdf = path.with_name(path.stem + "_latency_cdf.png")
    plot_latency_cdfs([(f"{rate_label(rate)} req/s", recs) for rate, recs, _ in runs], cdf)
    written = [path, cdf]
    if sweep:
        sweep_png = path.with_name(path.stem + "_sweep.png")
        plot_sweep([(rate_label(rate), rep) for rate, _, rep in runs], sweep_png)
        written.append(sweep_png)
    return written
