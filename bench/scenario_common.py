"""Shared pieces of the in-process scenario benchmarks (prefix caching, chunked prefill).

CLI flags every scenario takes, presets (full vs --smoke) that explicit flags override,
random token prompts, percentiles, and writing the JSON result beside its PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
from pathlib import Path
from typing import Any

# Token ids below this are the bench and test tokenizers' specials (<s>, </s>, <unk>).
FIRST_PLAIN_TOKEN = 3


def add_common_args(ap: argparse.ArgumentParser, default_out: str) -> None:
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) /
                    "conveyor-bench-llama-110m",
                    help="model directory; the 110M benchmark model is built there if missing")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype")
    ap.add_argument("--device", default="auto",
                    help="cpu, cuda, or auto (cuda when available)")
    ap.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (pair with a tiny --model-dir): checks the script runs")
    ap.add_argument("--threads", type=int,
                    help="torch intra-op threads (default: torch's choice); fewer than the "
                         "cores is steadier on a machine shared with other jobs")
    ap.add_argument("--out", type=Path, default=Path(default_out),
                    help="JSON result file; a PNG plot is written next to it")


def apply_preset(args: argparse.Namespace, presets: dict[str, dict[str, Any]]) -> dict:
    """Fill flags left at None from the "smoke" or "full" preset; returns the preset used."""
    preset = presets["smoke" if args.smoke else "full"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return preset


def setup_torch(args: argparse.Namespace) -> str:
    """Apply --threads; returns the device --device names (auto: cuda when available)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device != "auto":
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_model(model_dir: Path, dtype: str) -> Path:
    """The given model directory if it holds a model, else the benchmark model built there."""
    from bench.bench_model import build_bench_model

    return build_bench_model(model_dir, dtype=dtype)


def model_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def random_tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(FIRST_PLAIN_TOKEN, vocab_size) for _ in range(n)]


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
