"""The engine's request timestamps (first scheduling, first token, finish) and how the
output processor folds them into RequestOutput.metrics: exact values under a step clock."""

from __future__ import annotations

from bench.fake_runner import FakeRunner
from server.config import CacheConfig, SchedulerConfig
from server.engine.core import EngineCore
from server.engine.outputs import EngineCoreOutput, RequestTimes
from server.engine.scheduler import Scheduler
from server.output_processor import OutputProcessor
from server.request import Request
from server.sampling_params import SamplingParams
from tests.fake_engine import CharTokenizer, tok_ids


class StepClock:
    """Reads the number of the step being run: every stamp says which step made it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_core(budget: int, seqs: int, blocks: int = 64) -> tuple[EngineCore, StepClock]:
    clock = StepClock()
    sched = Scheduler(SchedulerConfig(seqs, budget, 64),
                      CacheConfig(block_size=4, enable_prefix_caching=False), blocks)
    return EngineCore(sched, FakeRunner(vocab_size=100), clock=clock), clock


def req(rid: str, prompt_len: int, max_tokens: int, start: int = 10) -> Request:
    return Request(rid, list(range(start, start + prompt_len)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=0.5)


def run_steps(core: EngineCore, clock: StepClock) -> dict[str, list[tuple[int, RequestTimes]]]:
    """Steps until idle; per request the (step, times) of every output that carried times."""
    stamped: dict[str, list[tuple[int, RequestTimes]]] = {}
    while core.has_unfinished_requests():
        clock.now += 1
        for o in core.step():
            if o.times is not None:
                stamped.setdefault(o.req_id, []).append((int(clock.now), o.times))
    return stamped


def test_chunked_prefill_and_queueing_stamp_each_phase():
    core, clock = make_core(budget=8, seqs=1)  # one at a time: b queues behind a
    core.add_request(req("a", 12, max_tokens=3))
    core.add_request(req("b", 4, max_tokens=2, start=40))
    stamped = run_steps(core, clock)
    # a: prompt chunks in steps 1-2 (token 1 at step 2), tokens 2, 3 at steps 3, 4.
    assert stamped["a"] == [(2, RequestTimes(0.5, 1.0, 2.0)),
                            (4, RequestTimes(0.5, 1.0, 2.0, 4.0))]
    # b waits for a's seat: admitted at step 5, where its 4-token prompt gives token 1.
    assert stamped["b"] == [(5, RequestTimes(0.5, 5.0, 5.0)),
                            (6, RequestTimes(0.5, 5.0, 5.0, 6.0))]
    assert core._times == {}


def test_preempted_request_keeps_its_first_scheduling():
    core, clock = make_core(budget=64, seqs=8, blocks=4)
    core.add_request(req("a", 4, max_tokens=6))
    core.add_request(req("b", 4, max_tokens=8, start=40))
    preempted_at = []
    while core.has_unfinished_requests():
        clock.now += 1
        before = core.scheduler.num_preemptions
        outs = core.step()
        if core.scheduler.num_preemptions > before:
            preempted_at.append(int(clock.now))
        final = {o.req_id: o.times for o in outs if o.finish_reason is not None}
        if "b" in final:
            b_times = final["b"]
    assert preempted_at == [6]  # a needs a third block; b, admitted last, gives way
    # b is admitted again at step 7 (recomputing), yet its queue time ended at step 1.
    assert b_times == RequestTimes(0.5, 1.0, 1.0, 9.0)


def test_aborted_and_stopped_requests_are_forgotten():
    core, clock = make_core(budget=64, seqs=8)
    for rid in ("a", "b", "c"):
        core.add_request(req(rid, 4, max_tokens=10))
    clock.now = 1
    core.step()
    assert sorted(core._times) == ["a", "b", "c"]
    core.abort_requests(["a"])
    core.stop_requests(["b"])
    assert sorted(core._times) == ["c"]


class Tokenizer(CharTokenizer):
    """CharTokenizer taking the Hugging Face decode options the detokenizer passes."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False,
               **_: object) -> str:
        return super().decode(ids, skip_special_tokens)


def out(rid: str, tokens: str, times: RequestTimes | None, finish: str | None = None
        ) -> EngineCoreOutput:
    return EngineCoreOutput(rid, tok_ids(tokens), finish_reason=finish, times=times)


def test_n_sequences_fold_into_earliest_start_and_latest_finish():
    proc = OutputProcessor(Tokenizer())
    ids = proc.add_request("r", "hi", tok_ids("hi"), SamplingParams(n=2, max_tokens=2),
                           stream=True)
    assert ids == ["0_r", "1_r"]
    first = proc.process([out("0_r", "a", RequestTimes(1.0, 2.0, 3.0)),
                          out("1_r", "b", RequestTimes(1.0, 2.5, 4.0))])
    assert [o.metrics for o in first.request_outputs] == [None]  # not finished yet
    proc.process([out("0_r", "c", RequestTimes(1.0, 2.0, 3.0, 5.0), "length")])
    last = proc.process([out("1_r", "d", RequestTimes(1.0, 2.5, 4.0, 7.0), "length")])
    (final,) = last.request_outputs
    assert final.finished
    assert final.metrics == RequestTimes(1.0, 2.0, 3.0, 7.0)
    assert (final.metrics.queue_time, final.metrics.prefill_time,
            final.metrics.decode_time) == (1.0, 1.0, 4.0)


def test_stop_string_finish_is_stamped_by_the_front_end():
    proc = OutputProcessor(Tokenizer())
    proc.add_request("r", "hi", tok_ids("hi"), SamplingParams(max_tokens=10, stop=["!"]))
    proc.process([out("r", "a", RequestTimes(1.0, 2.0, 3.0))])
    res = proc.process([out("r", "b!", None)])  # the engine does not know it is done
    assert res.stop_string_req_ids == ["r"]
    (final,) = res.request_outputs
    m = final.metrics
    assert m is not None and final.outputs[0].text == "ab"
    assert (m.arrival, m.first_scheduled, m.first_token) == (1.0, 2.0, 3.0)
    assert m.finished > 1000  # time.monotonic() here, not the scripted step clock


def test_no_engine_times_no_metrics():
    proc = OutputProcessor(Tokenizer())
    proc.add_request("r", "hi", tok_ids("hi"), SamplingParams(max_tokens=1))
    (final,) = proc.process([out("r", "a", None, "length")]).request_outputs
    assert final.finished and final.metrics is None
