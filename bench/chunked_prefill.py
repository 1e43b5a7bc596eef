"""Decode latency while a long prompt prefills: chunked vs unchunked, in-process.

16 requests with short prompts decode (greedy, ignore_eos) until they are in steady state;
their steady step time is the median gap between consecutive steps. Then one long prompt
(1900 tokens by default: the benchmark model's context is 2048) arrives and the engine keeps
stepping until the prompt has its first token and a while after. A decoder's inter-token
latency (ITL) is the time between consecutive steps in which it got a token; reported for
the prefill window (arrival to the long prompt's first token): p50 / p99 / max, p99 over the
steady step time (target <= 2), and the long prompt's time to first token (TTFT).

Each token budget (max_num_batched_tokens) gets its own engine: the chunked ones given, and
one that takes the whole prompt in a single step (effectively unchunked). All stay loaded
and the measurement is repeated in rounds that alternate between them (a new long prompt
each round); medians over rounds are reported, the median round is plotted.

    python bench/chunked_prefill.py --model-dir /tmp/benchmodel
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scenario_common import (  # noqa: E402
    add_common_args,
    apply_preset,
    blocks_for,
    config_dict,
    model_config,
    percentile,
    prepare_model,
    pyplot,
    random_tokens,
    setup_torch,
    write_json,
)

PRESETS = {
    "full": dict(num_decoders=16, decode_prompt_len=32, long_prompt_len=1900,
                 chunk_budgets=[256, 64], prefill_caps=[64, 32], cap_budget=2048,
                 max_model_len=2048, warmup_steps=5, steady_steps=30, after_steps=10,
                 rounds=3),
    "smoke": dict(num_decoders=4, decode_prompt_len=8, long_prompt_len=300,
                  chunk_budgets=[64], prefill_caps=[32], cap_budget=256, max_model_len=512,
                  warmup_steps=1, steady_steps=4, after_steps=2, rounds=2),
}
BLOCK_SIZE = 16
ITL_TARGET = 2.0  # p99 decoder ITL during the prefill, in steady step times


@dataclass(frozen=True)
class Step:
    """One engine step as the benchmark saw it."""

    phase: str  # "warmup", "steady", "prefill" (long prompt arrived, no token yet), "after"
    t_end: float
    seconds: float
    # For each decoder, whether it got a token in this step.
    served: tuple[bool, ...]
    long_prompt_tokens: int  # long-prompt tokens computed in this step


def itls(steps: list[Step], num_decoders: int) -> list[tuple[str, float, float]]:
    """(phase, end time, gap) for every decoder token after its first."""
    last: list[float | None] = [None] * num_decoders
    out = []
    for s in steps:
        for d, got in enumerate(s.served):
            if not got:
                continue
            if last[d] is not None:
                out.append((s.phase, s.t_end, s.t_end - last[d]))
            last[d] = s.t_end
    return out


class BudgetRun:
    """One engine with one token budget and its decoders, measured round after round.

    Engines of all budgets stay loaded so rounds can alternate between them: a burst of
    load from elsewhere on the machine then hits every budget, not just one.
    """

    def __init__(self, model_dir: Path, args: argparse.Namespace, label: str, budget: int,
                 cap: int, decode_prompts: list[list[int]], warm_prompt: list[int],
                 max_decode_tokens: int) -> None:
        from server import LLM, SamplingParams

        self.label, self.budget, self.cap, self.args = label, budget, cap, args
        self.llm = LLM(
            str(model_dir), dtype=args.dtype, device=args.device,
            max_model_len=args.max_model_len, max_num_batched_tokens=budget,
            long_prefill_token_threshold=cap,
            enable_prefix_caching=False, block_size=BLOCK_SIZE,
            num_kv_blocks=(len(decode_prompts) * blocks_for(args.decode_prompt_len
                                                            + max_decode_tokens, BLOCK_SIZE)
                           + 2 * blocks_for(args.max_model_len, BLOCK_SIZE)))
        # Warm-up: a prompt as long as the measured ones, so first-use costs of its shapes
        # (allocator growth, kernel selection) stay out of the measurement.
        self.llm.generate([{"prompt_token_ids": warm_prompt}] +
                          [{"prompt_token_ids": p} for p in decode_prompts],
                          SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
                          use_tqdm=False)
        self.engine = self.llm.engine
        self.scheduler = self.engine.core.scheduler
        self.params = SamplingParams(temperature=0.0, max_tokens=max_decode_tokens,
                                     ignore_eos=True)
        self.ids = [self.engine.add_request(f"dec{i}", {"prompt_token_ids": p}, self.params)
                    for i, p in enumerate(decode_prompts)]
        self.decoders = [self.scheduler.requests[i] for i in self.ids]
        while min(r.num_output_tokens for r in self.decoders) == 0:  # short prompts' prefill
            self.engine.step()

    def _step(self, phase: str, steps: list[Step], long_req=None) -> None:
        before = [r.num_output_tokens for r in self.decoders]
        long_before = long_req.num_computed_tokens if long_req is not None else 0
        t0 = time.perf_counter()
        self.engine.step()
        t1 = time.perf_counter()
        long_tokens = long_req.num_computed_tokens - long_before if long_req is not None else 0
        steps.append(Step(phase, t1, t1 - t0,
                          tuple(r.num_output_tokens > b for r, b in zip(self.decoders, before)),
                          long_tokens))

    def round(self, index: int, long_prompt: list[int]) -> dict:
        """Steady decoding, then a long prompt arrives; returns this round's summary."""
        args, steps = self.args, []
        for phase, n in (("warmup", args.warmup_steps), ("steady", args.steady_steps)):
            for _ in range(n):
                self._step(phase, steps)
        req_id = f"long{index}"
        t_add = time.perf_counter()
        self.engine.add_request(req_id, {"prompt_token_ids": long_prompt}, self.params)
        long_req = self.scheduler.requests[req_id]
        while long_req.num_output_tokens == 0:
            self._step("prefill", steps, long_req)
        t_first = steps[-1].t_end
        for _ in range(args.after_steps):
            self._step("after", steps, long_req)
        self.engine.abort_request([req_id])
        return summarize(steps, len(self.decoders), t_add, t_first)

    def close(self) -> int:
        """Abort the decoders and drop the engine; returns the preemptions it saw."""
        self.engine.abort_request(self.ids)
        preemptions = self.scheduler.num_preemptions
        del self.llm, self.engine, self.scheduler, self.decoders
        gc.collect()
        return preemptions


def summarize(steps: list[Step], num_decoders: int, t_add: float, t_first: float) -> dict:
    gaps = itls(steps, num_decoders)
    by_phase = {p: [g for ph, _, g in gaps if ph == p] for p in ("steady", "prefill", "after")}
    steady = statistics.median(by_phase["steady"])
    window = by_phase["prefill"]
    prefill_steps = [s for s in steps if s.phase == "prefill"]
    p99 = percentile(window, 99)
    # One gap per step (the time since the previous step), for the plot.
    first = next(i for i, s in enumerate(steps) if s.phase != "warmup")
    timeline = [{"t": s.t_end - t_add, "gap_ms": (s.t_end - prev.t_end) * 1e3,
                 "phase": s.phase, "long_prompt_tokens": s.long_prompt_tokens,
                 "decoders_served": sum(s.served)}
                for prev, s in zip(steps[first - 1:], steps[first:])]
    return {
        "steady_step_ms": steady * 1e3,
        "itl_ms": {"p50": percentile(window, 50) * 1e3, "p99": p99 * 1e3,
                   "max": max(window) * 1e3, "count": len(window)},
        "p99_over_steady": p99 / steady,
        "after_prefill_itl_p50_ms": percentile(by_phase["after"], 50) * 1e3,
        "ttft_s": t_first - t_add,
        "prefill_steps": len(prefill_steps),
        "prefill_chunks": [s.long_prompt_tokens for s in prefill_steps],
        "prefill_step_ms_median": statistics.median(s.seconds for s in prefill_steps) * 1e3,
        # (step, decoder) pairs in the prefill window where a decoder got no token.
        "decoder_tokens_missed": sum(not got for s in prefill_steps for got in s.served),
        "timeline": timeline,
    }


def combine(label: str, budget: int, cap: int, rounds: list[dict], preemptions: int) -> dict:
    """Medians over rounds; the timeline of the round with the median p99/steady."""
    def med(get) -> float:
        return statistics.median(get(r) for r in rounds)

    ratio = med(lambda r: r["p99_over_steady"])
    typical = sorted(rounds, key=lambda r: r["p99_over_steady"])[(len(rounds) - 1) // 2]
    return {
        "label": label, "max_num_batched_tokens": budget, "long_prefill_token_threshold": cap,
        "rounds": len(rounds),
        "steady_step_ms": med(lambda r: r["steady_step_ms"]),
        "itl_ms": {k: med(lambda r, k=k: r["itl_ms"][k]) for k in ("p50", "p99", "max")},
        "p99_over_steady": ratio,
        "meets_target": ratio <= ITL_TARGET,
        "after_prefill_itl_p50_ms": med(lambda r: r["after_prefill_itl_p50_ms"]),
        "ttft_s": med(lambda r: r["ttft_s"]),
        "prefill_steps": typical["prefill_steps"],
        "prefill_chunks": typical["prefill_chunks"],
        "prefill_step_ms_median": med(lambda r: r["prefill_step_ms_median"]),
        "decoder_tokens_missed": sum(r["decoder_tokens_missed"] for r in rounds),
        "num_preemptions": preemptions,
        "timeline": typical["timeline"],
        "per_round": [{k: v for k, v in r.items() if k != "timeline"} for r in rounds],
    }


def plot(results: list[dict], path: Path, long_len: int, num_decoders: int) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    colors = ["#2b6cb0", "#38a169", "#805ad5", "#dd6b20", "#319795", "#d69e2e"]
    for r, color in zip(results, colors[:len(results) - 1] + ["#c53030"]):
        tl = r["timeline"]
        # Each gap spans the time since the previous step: drawn as a step ending at t.
        ax.plot([p["t"] for p in tl], [p["gap_ms"] for p in tl], drawstyle="steps-pre",
                lw=1.2, color=color, label=f"{r['label']}: p99/steady {r['p99_over_steady']:.1f}, "
                f"TTFT {r['ttft_s'] * 1e3:.0f} ms")
        ax.axvspan(0, r["ttft_s"], color=color, alpha=0.08)
        ax.axhline(ITL_TARGET * r["steady_step_ms"], color=color, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since the long prompt arrived (shaded: until its first token)")
    ax.set_ylabel("decoder inter-token latency (ms)")
    ax.set_title(f"{num_decoders} decoders while a {long_len}-token prompt prefills "
                 f"(dashed: {ITL_TARGET:g}x steady step)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, "bench/results/chunked_prefill.json")
    ap.add_argument("--num-decoders", type=int, help="decoding requests (default 16)")
    ap.add_argument("--decode-prompt-len", type=int, help="their prompt length (default 32)")
    ap.add_argument("--long-prompt-len", type=int, help="the long prompt (default 1900)")
    ap.add_argument("--chunk-budgets", type=int, nargs="+",
                    help="max_num_batched_tokens of the chunked runs (default 256 64); an "
                         "unchunked run (prompt + decoders in one step) is always added")
    ap.add_argument("--prefill-caps", type=int, nargs="*",
                    help="long_prefill_token_threshold values, each run at --cap-budget: "
                         "the prompt's chunk is capped while the decoders run (default 64 32)")
    ap.add_argument("--cap-budget", type=int,
                    help="max_num_batched_tokens of the capped runs (default 2048, the "
                         "server's default)")
    ap.add_argument("--max-model-len", type=int, help="context length (default 2048)")
    ap.add_argument("--warmup-steps", type=int, help="decode steps before measuring")
    ap.add_argument("--steady-steps", type=int, help="steps measuring the steady step time")
    ap.add_argument("--after-steps", type=int, help="steps after the long prompt's 1st token")
    ap.add_argument("--rounds", type=int,
                    help="measurements per budget, alternating budgets; medians reported")
    args = ap.parse_args()
    apply_preset(args, PRESETS)
    args.device = setup_torch(args)
    if args.long_prompt_len >= args.max_model_len:
        ap.error("--long-prompt-len must be below --max-model-len")
    if min(args.chunk_budgets) <= args.num_decoders:
        ap.error("every budget must exceed --num-decoders, or the long prompt never runs")
    if any(c < 1 for c in args.prefill_caps) or args.cap_budget <= args.num_decoders:
        ap.error("--prefill-caps must be >= 1 and --cap-budget above --num-decoders")
    if args.warmup_steps < 1 or args.steady_steps < 1 or args.rounds < 1:
        ap.error("--warmup-steps, --steady-steps and --rounds must be >= 1")
    model_dir = prepare_model(args.model_dir, args.dtype)
    vocab_size = model_config(model_dir)["vocab_size"]
    rng = random.Random(args.seed)
    decode_prompts = [random_tokens(rng, args.decode_prompt_len, vocab_size)
                      for _ in range(args.num_decoders)]
    warm_prompt = random_tokens(rng, args.long_prompt_len, vocab_size)
    long_prompts = [random_tokens(rng, args.long_prompt_len, vocab_size)
                    for _ in range(args.rounds)]
    unchunked = args.long_prompt_len + args.num_decoders
    budgets = ([(f"chunked-{b}", b, 0) for b in args.chunk_budgets]
               + [(f"cap-{c}", args.cap_budget, c) for c in args.prefill_caps]
               + [("unchunked", unchunked, 0)])
    # Decoders must outlast every round (twice the most steps a round can take).
    fewest = min([b - args.num_decoders for b in args.chunk_budgets] + args.prefill_caps)
    slowest = -(-args.long_prompt_len // fewest)
    per_round = args.warmup_steps + args.steady_steps + slowest + 1 + args.after_steps
    max_decode_tokens = min(2 * args.rounds * per_round + 8,
                            args.max_model_len - args.decode_prompt_len)

    runs = [BudgetRun(model_dir, args, label, b, cap, decode_prompts, warm_prompt,
                      max_decode_tokens) for label, b, cap in tqdm(budgets, desc="loading engines")]
    per_budget: list[list[dict]] = [[] for _ in runs]
    with tqdm(total=args.rounds * len(runs), desc="rounds", unit="run") as bar:
        for r in range(args.rounds):
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for i in order:
                per_budget[i].append(runs[i].round(r, long_prompts[r]))
                bar.update(1)
    results = [combine(run.label, run.budget, run.cap, rounds, run.close())
               for run, rounds in zip(runs, per_budget)]

    print(f"{args.num_decoders} decoders (prompt {args.decode_prompt_len}), a "
          f"{args.long_prompt_len}-token prompt arrives; {args.dtype} on {args.device}; "
          f"medians of {args.rounds} rounds per budget (budgets alternated)")
    base = results[-1]
    for r in results:
        itl = r["itl_ms"]
        print(f"  {r['label']:>12} (budget {r['max_num_batched_tokens']:5d}): steady step "
              f"{r['steady_step_ms']:6.1f} ms; prefill-window ITL p50 {itl['p50']:7.1f} p99 "
              f"{itl['p99']:7.1f} max {itl['max']:7.1f} ms; p99/steady {r['p99_over_steady']:5.2f}"
              f" ({'meets' if r['meets_target'] else 'misses'} <= {ITL_TARGET:g}); TTFT "
              f"{r['ttft_s'] * 1e3:7.0f} ms (x{r['ttft_s'] / base['ttft_s']:.2f} of unchunked) "
              f"in {r['prefill_steps']} steps; decoder tokens missed "
              f"{r['decoder_tokens_missed']}")
    write_json(args.out, {"config": config_dict(args), "model_dir": str(model_dir),
                          "results": {r["label"]: r for r in results}})
    png = args.out.with_suffix(".png")
    plot(results, png, args.long_prompt_len, args.num_decoders)
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
