"""The GPU benchmark scripts run end to end on tiny shapes (CPU, Triton interpreter), so a
GPU session spends its minutes measuring rather than debugging the scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, out: Path) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT),
               CONVEYOR_NATIVE_CPU="0")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke",
                           "--out", str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_kernels_bench_smoke(tmp_path):
    res = _run("kernels.py", tmp_path / "kernels.json")
    assert res["decode"]["fraction_of_copy"] > 0 and res["decode"]["max_abs_err"] < 3e-2
    assert res["prefill"][0]["speed_vs_sdpa"] > 0 and res["prefill"][0]["max_abs_err"] < 3e-2
    assert {(r["M"], r["K"], r["N"]) for r in res["matmul"]} == {(1, 256, 128), (16, 256, 128)}
    assert (tmp_path / "kernels.png").stat().st_size > 0


def test_decode_roofline_smoke(tmp_path):
    res = _run("decode_roofline.py", tmp_path / "decode.json")
    runs = {r["quantization"]: r for r in res["runs"]}
    assert set(runs) == {"bf16", "int8", "int4"}
    # Quantized weights stream fewer bytes per step, so their roofline is higher.
    assert (runs["int4"]["weight_bytes_per_step"] < runs["int8"]["weight_bytes_per_step"]
            < runs["bf16"]["weight_bytes_per_step"])
    assert all(r["eager_tok_per_s"] > 0 for r in runs.values())
