"""Kernel benchmarks against same-run baselines, written as JSON (and a PNG next to it).

- paged decode attention: achieved GB/s as a share of a device-to-device copy;
- prefill attention: speed relative to torch's scaled_dot_product_attention;
- W8A16 / W4A16 matmuls: speed-up over a bf16 torch.matmul (cuBLAS) on Llama-8B shapes.

    PYTHONPATH=. python bench/kernels.py --out bench/results/kernels.json     # on a GPU
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/kernels.py --smoke            # CPU check

Every section checks its kernel against the torch reference before timing it.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.timing import Timer  # noqa: E402
from kernels import quant, reference  # noqa: E402

# Llama-3-8B: 32 query heads, 8 KV heads of 128; hidden 4096, MLP 14336.
HQ, HKV, HEAD_DIM = 32, 8, 128
MATMUL_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N): y[M, N] = x @ W.T
MATMUL_M = [1, 4, 16, 64]


def _paged_inputs(num_seqs: int, ctx: int, qlen: int, hq: int, hkv: int, d: int,
                  block_size: int, dtype: torch.dtype, device: torch.device,
                  gen: torch.Generator) -> dict:
    """A KV cache holding num_seqs contexts of `ctx` tokens in shuffled blocks."""
    per_seq = -(-ctx // block_size)
    num_blocks = num_seqs * per_seq + 1
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=gen,
                        device=device).to(dtype)
    perm = torch.randperm(num_blocks - 1, generator=gen, device=device) + 1
    tables = perm.view(num_seqs, per_seq).to(torch.int32)
    q = torch.randn(num_seqs * qlen, hq, d, generator=gen, device=device).to(dtype)
    qsl = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=device) * qlen
    lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device=device)
    return dict(query=q, kv_cache=cache, query_start_loc=qsl, seq_lens=lens,
                block_tables=tables)


def _check_attention(inputs: dict, scale: float, out: torch.Tensor, tol: float) -> float:
    ref = reference.paged_attention(
        inputs["query"].float(), inputs["kv_cache"].float(), inputs["query_start_loc"].cpu(),
        inputs["seq_lens"].cpu(), inputs["block_tables"], scale)
    err = (out.float() - ref).abs().max().item()
    if err > tol:
        raise AssertionError(f"attention differs from the reference by {err:.3g} > {tol}")
    return err


def bench_decode(timer: Timer, cfg: dict, gen: torch.Generator) -> dict:
    from kernels.triton_attention import paged_attention

    n, ctx, bs = cfg["decode_seqs"], cfg["decode_ctx"], 16
    hq, hkv, d = cfg["heads"]
    inp = _paged_inputs(n, ctx, 1, hq, hkv, d, bs, torch.bfloat16, timer.device, gen)
    scale = d ** -0.5
    run = partial(paged_attention, **inp, scale=scale, max_query_len=1, max_seq_len=ctx)
    err = _check_attention(inp, scale, run(), tol=3e-2)
    ms = timer.median_ms(run)
    kv_bytes = 2 * n * ctx * hkv * d * 2
    copy = timer.copy_bandwidth_gbs(cfg["copy_bytes"])
    gbs = kv_bytes / (ms * 1e-3) / 1e9
    return {"seqs": n, "context": ctx, "heads": [hq, hkv, d], "block_size": bs,
            "ms": ms, "kv_gb_per_s": gbs, "copy_gb_per_s": copy,
            "fraction_of_copy": gbs / copy, "max_abs_err": err}


def bench_prefill(timer: Timer, cfg: dict, gen: torch.Generator) -> list[dict]:
    import torch.nn.functional as F

    from kernels.triton_attention import paged_attention

    hq, hkv, d = cfg["heads"]
    rows = []
    for n, length in cfg["prefill"]:
        inp = _paged_inputs(n, length, length, hq, hkv, d, 16, torch.bfloat16, timer.device,
                            gen)
        scale = d ** -0.5
        run = partial(paged_attention, **inp, scale=scale, max_query_len=length,
                      max_seq_len=length)
        err = _check_attention(inp, scale, run(), tol=3e-2) if cfg["check_prefill"] else None
        ms = timer.median_ms(run, reps=10)
        # SDPA on contiguous [B, H, L, D] copies of the same K/V, heads pre-expanded for GQA
        # so it can pick its fastest (flash) kernel.
        q = inp["query"].view(n, length, hq, d).transpose(1, 2).contiguous()
        k = torch.randn(n, hq, length, d, generator=gen, device=timer.device).to(q.dtype)
        v = torch.randn_like(k)
        sdpa = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, scale=scale)
        base = timer.median_ms(sdpa, reps=10)
        rows.append({"seqs": n, "length": length, "ms": ms, "sdpa_ms": base,
                     "speed_vs_sdpa": base / ms, "max_abs_err": err})
    return rows


def bench_matmuls(timer: Timer, cfg: dict, gen: torch.Generator) -> list[dict]:
    from kernels.triton_quant_matmul import w4a16_matmul, w8a16_matmul

    dev, rows = timer.device, []
    for k, n in cfg["matmul_shapes"]:
        w = (torch.randn(n, k, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        q8, s8 = quant.quantize_int8(w)
        q4, s4, z4 = quant.quantize_int4(w, 128)
        for m in cfg["matmul_m"]:
            x = torch.randn(m, k, generator=gen, device=dev).to(torch.bfloat16)
            want8 = quant.int8_matmul_ref(x.float(), q8, s8)
            want4 = quant.int4_matmul_ref(x.float(), q4, s4.float(), z4, 128)
            got8, got4 = w8a16_matmul(x, q8, s8), w4a16_matmul(x, q4, s4, z4, 128)
            for name, got, want in (("int8", got8, want8), ("int4", got4, want4)):
                rel = ((got.float() - want).norm() / want.norm()).item()
                if rel > 2e-2:
                    raise AssertionError(f"{name} matmul M={m} K={k} N={n}: rel err {rel:.3g}")
            t16 = timer.median_ms(partial(torch.matmul, x, w.t()))
            t8 = timer.median_ms(partial(w8a16_matmul, x, q8, s8))
            t4 = timer.median_ms(partial(w4a16_matmul, x, q4, s4, z4, 128))
            rows.append({"M": m, "K": k, "N": n, "bf16_ms": t16, "int8_ms": t8, "int4_ms": t4,
                         "int8_speedup": t16 / t8, "int4_speedup": t16 / t4})
    return rows


def _section(results: dict, name: str, fn: Callable[[], object]) -> None:
    """Run one section; a failure is recorded and the others still run."""
    print(f"== {name}", flush=True)
    try:
        results[name] = fn()
        print(json.dumps(results[name], indent=1), flush=True)
    except Exception as exc:  # noqa: BLE001 - report and go on to the next section
        traceback.print_exc()
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("matmul")
    if not isinstance(rows, list) or not rows:
        return
    fig, ax = plt.subplots(figsize=(8, 3.8))
    labels = [f"M{r['M']}\n{r['K']}x{r['N']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["int8_speedup"] for r in rows], 0.4, label="W8A16")
    ax.bar([x + 0.2 for x in xs], [r["int4_speedup"] for r in rows], 0.4, label="W4A16")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_ylabel("speed-up over bf16 cuBLAS")
    ax.set_title(f"Quantized matmul, {results.get('device', '')}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


CONFIGS = {
    "full": {"heads": (HQ, HKV, HEAD_DIM), "decode_seqs": 32, "decode_ctx": 4096,
             "copy_bytes": 1 << 30, "prefill": [(1, 4096), (4, 1024)], "check_prefill": False,
             "matmul_shapes": MATMUL_SHAPES, "matmul_m": MATMUL_M},
    # Runs everything once on the CPU under TRITON_INTERPRET=1, to test this script.
    "smoke": {"heads": (4, 2, 32), "decode_seqs": 2, "decode_ctx": 40, "copy_bytes": 1 << 20,
              "prefill": [(2, 24)], "check_prefill": True,
              "matmul_shapes": [(256, 128)], "matmul_m": [1, 16]},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"),
                    help="JSON result file; a PNG of the matmul speed-ups goes next to it")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on the CPU (TRITON_INTERPRET=1): checks the script runs")
    ap.add_argument("--sections", default="decode,prefill,matmul",
                    help="comma-separated subset of decode, prefill, matmul")
    args = ap.parse_args()
    cfg = CONFIGS["smoke" if args.smoke else "full"]
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --smoke with TRITON_INTERPRET=1 on the CPU")
    timer = Timer(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    results: dict = {"device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                else "cpu (interpreter)"),
                     "torch": torch.__version__}
    sections = {"decode": lambda: bench_decode(timer, cfg, gen),
                "prefill": lambda: bench_prefill(timer, cfg, gen),
                "matmul": lambda: bench_matmuls(timer, cfg, gen)}
    for name in args.sections.split(","):
        _section(results, name, sections[name])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    if any(isinstance(v, dict) and "error" in v for v in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
