"""The zero-cost half of bench/scheduler_overhead.py: a fake model runner, a per-step
phase timer, and one timed run of the real engine loop at N running sequences.

`FakeRunner.execute` takes a SchedulerOutput and returns a RunnerOutput exactly as
server/runner/model_runner.py does (one sampled token for every request whose computed
tokens reach all its known tokens after this step, none for a prompt chunk), but keeps
only two integers per request, so what a benchmark measures around it is the scheduler's
and the output path's own cost. Sampled ids come from a fixed linear congruential
sequence over [first_token_id, vocab_size), so runs are reproducible and detokenizing
them costs what decoding ordinary tokens costs.

`PhaseTimer` wraps callables (bound methods, patched from outside) and keeps each phase's
wall time per engine step, so no server code carries instrumentation. `run_fake` drives
EngineCore (real Scheduler, FakeRunner) and the OutputProcessor with them.
"""

from __future__ import annotations

import cProfile
import gc
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from server.config import CacheConfig, SchedulerConfig
from server.engine.core import EngineCore
from server.engine.outputs import RunnerOutput, SchedulerOutput
from server.engine.scheduler import Scheduler
from server.output_processor import OutputProcessor
from server.request import Request
from server.sampling_params import SamplingParams

TARGET_SCHED_UPDATE_US = 1000.0


@dataclass
class _ReqState:
    num_tokens: int  # prompt + output tokens the runner knows
    num_computed: int  # tokens whose KV exists once the current step has run


@dataclass
class FakeRunner:
    vocab_size: int
    # Ids below this are special (BOS/EOS/UNK in the bench tokenizers): never sampled.
    first_token_id: int = 3
    seed: int = 0
    num_steps: int = 0
    num_scheduled_tokens: int = 0
    num_sampled_tokens: int = 0
    _requests: dict[str, _ReqState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vocab_size <= self.first_token_id:
            raise ValueError(f"vocab_size {self.vocab_size} leaves no ordinary token ids")
        self._state = self.seed & 0x7FFFFFFF

    @property
    def num_requests(self) -> int:
        """Requests the runner holds state for (dropped once finished or preempted)."""
        return len(self._requests)

    def _next_token(self) -> int:
        self._state = (self._state * 1103515245 + 12345) & 0x7FFFFFFF
        return self.first_token_id + (self._state >> 8) % (self.vocab_size - self.first_token_id)

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        reqs = self._requests
        for req_id in sched.finished_req_ids | sched.preempted_req_ids:
            reqs.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            reqs[new.req_id] = _ReqState(
                len(new.prompt_token_ids) + len(new.output_token_ids), new.num_computed_tokens)
        for cached in sched.scheduled_cached_reqs:
            reqs[cached.req_id].num_computed = cached.num_computed_tokens
        out = RunnerOutput()
        if sched.total_num_scheduled_tokens == 0:
            return out
        self.num_steps += 1
        self.num_scheduled_tokens += sched.total_num_scheduled_tokens
        sampled = out.sampled_token_ids
        for req_id, n in sched.num_scheduled_tokens.items():
            state = reqs[req_id]
            state.num_computed += n
            if state.num_computed >= state.num_tokens:
                sampled[req_id] = [self._next_token()]
                state.num_tokens += 1
        self.num_sampled_tokens += len(sampled)
        return out


class PhaseTimer:
    """Per-step wall time of named phases, gathered by wrapping callables.

    A phase called several times in a step is summed; one not called counts 0. Only steps
    ended while `recording` is set are kept.
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.recording = False
        self.samples: dict[str, list[int]] = {}  # phase -> ns per recorded step
        self.calls: dict[str, int] = {}  # phase -> calls in recorded steps
        self._step: dict[str, int] = {}
        self._step_calls: dict[str, int] = {}

    def wrap(self, name: str, fn: Callable[..., Any], sync: bool = False) -> Callable[..., Any]:
        self.samples.setdefault(name, [])
        self.calls.setdefault(name, 0)
        step, step_calls, now = self._step, self._step_calls, time.perf_counter_ns
        do_sync = self.sync if sync else None

        def timed(*args: Any, **kwargs: Any) -> Any:
            if do_sync is not None:
                do_sync()  # earlier queued device work is not this phase's
            t0 = now()
            result = fn(*args, **kwargs)
            if do_sync is not None:
                do_sync()
            step[name] = step.get(name, 0) + now() - t0
            step_calls[name] = step_calls.get(name, 0) + 1
            return result

        return timed

    def end_step(self) -> None:
        if self.recording:
            for name, series in self.samples.items():
                series.append(self._step.get(name, 0))
                self.calls[name] += self._step_calls.get(name, 0)
        self._step.clear()
        self._step_calls.clear()


def summarize(ns: list[int], scale: float) -> dict[str, float]:
    """mean / p50 / p99 / max of per-step nanoseconds, divided by `scale`."""
    xs = sorted(ns)
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0, "max": 0.0}

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * len(xs)))] / scale

    return {"mean": sum(xs) / len(xs) / scale, "p50": q(0.5), "p99": q(0.99),
            "max": xs[-1] / scale}


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@dataclass(frozen=True)
class FakeRun:
    """One zero-cost run: N sequences decoding through the real scheduler."""

    num_running: int
    prefix_caching: bool = True
    output: str = "offline"  # "none" | "offline" (LLM.generate) | "stream" (HTTP deltas)
    # gc.freeze() before the timed steps: a full collection then skips the start-up heap.
    gc_freeze: bool = False
    steps: int = 300  # timed steps
    warmup: int = 20  # untimed decode steps first
    input_len: tuple[int, int] = (64, 192)
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    seed: int = 0

    @property
    def name(self) -> str:
        return (f"n{self.num_running}-prefix_{'on' if self.prefix_caching else 'off'}"
                f"-output_{self.output}" + ("-gc_frozen" if self.gc_freeze else ""))


def run_fake(run: FakeRun, tokenizer: Any, profiler: cProfile.Profile | None = None) -> dict:
    """Fill N sequences, warm up, then time `run.steps` steps with N decoding in each.

    Times schedule(), the runner, update_from_output, the whole EngineCore.step and the
    output processor (what LLMEngine.step runs after it) per step; counts what was
    scheduled, sampled and detokenized so a caller can check them against N x steps.
    """
    n, bs, budget = run.num_running, run.block_size, run.max_num_batched_tokens
    lo, hi = run.input_len
    # Prefill takes at most ceil(N * hi / (budget - N)) steps; every sequence then grows
    # one token per step. None may finish (it would change N), none may be preempted.
    fill_bound = -(-n * hi // max(budget - n, 1)) + 1
    max_len = hi + fill_bound + run.warmup + run.steps + 1
    if max_len > run.max_model_len:
        raise ValueError(f"{max_len} tokens per sequence exceed max_model_len")
    num_blocks = n * (-(-max_len // bs) + 1)
    sched = Scheduler(SchedulerConfig(n, budget, run.max_model_len),
                      CacheConfig(block_size=bs, enable_prefix_caching=run.prefix_caching),
                      num_blocks)
    runner = FakeRunner(vocab_size=len(tokenizer), seed=run.seed)
    core = EngineCore(sched, runner)
    timer = PhaseTimer()
    sched.schedule = timer.wrap("schedule", sched.schedule)
    sched.update_from_output = timer.wrap("update", sched.update_from_output)
    runner.execute = timer.wrap("runner", runner.execute)
    step = timer.wrap("engine_step", core.step)
    op = OutputProcessor(tokenizer) if run.output != "none" else None
    process = timer.wrap("output", op.process) if op is not None else None

    params = SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)
    ids = [f"r{i}" for i in range(n)]
    for rid, prompt in zip(ids, random_prompts(n, lo, hi, len(tokenizer), run.seed)):
        if op is not None:
            op.add_request(rid, None, prompt, params, stream=run.output == "stream")
        core.add_request(Request(rid, prompt, params, frozenset({1}),
                                 max_tokens=run.max_model_len - len(prompt)))

    def one_step() -> list:
        outs = step()
        if process is not None:
            stopped = process(outs).stop_string_req_ids
            if stopped:
                core.stop_requests(stopped)
        timer.end_step()
        return outs

    fill_steps = 0
    while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):
        one_step()
        fill_steps += 1
    for _ in range(run.warmup):
        one_step()
    sched_before, sampled_before = runner.num_scheduled_tokens, runner.num_sampled_tokens
    emitted = 0
    if run.gc_freeze:
        gc.freeze()
    gc_before = [g["collections"] for g in gc.get_stats()]
    full_gc_ms: list[float] = []
    gc_start = [0]

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                gc_start[0] = time.perf_counter_ns()
            else:
                full_gc_ms.append((time.perf_counter_ns() - gc_start[0]) / 1e6)

    gc.callbacks.append(on_gc)
    timer.recording = True
    if profiler is not None:
        profiler.enable()
    for _ in tqdm(range(run.steps), desc=run.name, unit="step", leave=False):
        outs = one_step()
        if len(outs) != n or any(o.finish_reason for o in outs):
            raise RuntimeError(f"{run.name}: a measured step did not decode all {n} sequences")
        emitted += sum(len(o.new_token_ids) for o in outs)
    if profiler is not None:
        profiler.disable()
    timer.recording = False
    # Collector passes during the timed steps: a generation-2 pass walks the whole heap
    # (tokenizer, torch and transformers modules included) and shows as the max step.
    gc_passes = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before)]
    gc.callbacks.remove(on_gc)
    if run.gc_freeze:
        gc.unfreeze()

    counts = {
        "fill_steps": fill_steps,
        "measured_steps": len(timer.samples["engine_step"]),
        "scheduled_tokens": runner.num_scheduled_tokens - sched_before,
        "sampled_tokens": runner.num_sampled_tokens - sampled_before,
        "emitted_tokens": emitted,
        "expected_tokens": n * run.steps,
        "total_output_tokens": sum(r.num_output_tokens for r in sched.requests.values()),
        "runner_sampled_total": runner.num_sampled_tokens,
        "preemptions": sched.num_preemptions,
    }
    if op is not None:
        counts["detokenized_tokens"] = sum(len(s.token_ids) for p in op.parents.values()
                                           for s in p.seqs.values())
    core.abort_requests(ids)
    if op is not None:
        op.abort(ids)
    core.step()  # lets the runner drop the aborted requests' state
    counts["drained"] = not core.has_unfinished_requests() and runner.num_requests == 0

    samples = dict(timer.samples)
    samples["schedule+update"] = [a + b for a, b in zip(samples["schedule"], samples["update"])]
    if op is not None:
        samples["step_with_output"] = [a + b for a, b in zip(samples["engine_step"],
                                                             samples["output"])]
    phases = {k: summarize(v, 1e3) for k, v in samples.items()}
    return {"name": run.name, **asdict(run), "counts": counts, "phases_us": phases,
            "gc_passes_by_generation": gc_passes, "full_gc_ms": full_gc_ms,
            "target_met": phases["schedule+update"]["p50"] < TARGET_SCHED_UPDATE_US}
