"""Scheduler driven by fake runner outputs: exact budgets, block ids, preemption, stops."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.config import CacheConfig, SchedulerConfig
from server.engine.outputs import EngineCoreOutput, Logprobs, RunnerOutput, SchedulerOutput
from server.engine.scheduler import Scheduler, SchedulerStats
from server.request import Request, RequestStatus
from server.sampling_params import SamplingParams

TokenFn = Callable[[Request], list[int]]


def make(budget: int = 64, seqs: int = 8, max_len: int = 64, bs: int = 4,
         blocks: int = 64, caching: bool = True) -> Scheduler:
    return Scheduler(SchedulerConfig(seqs, budget, max_len),
                     CacheConfig(block_size=bs, enable_prefix_caching=caching), blocks)


def req(rid: str, n: int, start: int = 0, eos: frozenset[int] = frozenset(),
        **params: object) -> Request:
    params.setdefault("max_tokens", 100)
    return Request(rid, list(range(start, start + n)), SamplingParams(**params),  # type: ignore[arg-type]
                   eos_token_ids=eos)


def run(sched: Scheduler, out: SchedulerOutput, token_fn: TokenFn | None = None,
        **extra: object) -> list[EngineCoreOutput]:
    """Fake runner: a request whose tokens are all computed after this step samples."""
    sampled = {}
    for rid in out.num_scheduled_tokens:
        r = sched.requests[rid]
        if r.num_computed_tokens >= r.num_tokens:
            sampled[rid] = token_fn(r) if token_fn else [1000 + r.num_output_tokens]
    return sched.update_from_output(out, RunnerOutput(sampled_token_ids=sampled, **extra))  # type: ignore[arg-type]


def step(sched: Scheduler, token_fn: TokenFn | None = None
         ) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = sched.schedule()
    return out, run(sched, out, token_fn)


def test_chunked_prefill_interleaves_with_decode() -> None:
    s = make(budget=8, caching=False)
    s.add_request(req("a", 20, max_tokens=3))
    s.add_request(req("b", 20, start=100, max_tokens=3))
    expected = [{"a": 8}, {"a": 8}, {"a": 4, "b": 4}, {"a": 1, "b": 7}, {"a": 1, "b": 7},
                {"b": 2}, {"b": 1}, {"b": 1}]
    got, outs = [], []
    for _ in expected:
        out, o = step(s)
        got.append(out.num_scheduled_tokens)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        outs.append(out)
        if len(got) == 3:
            (new,) = out.scheduled_new_reqs
            assert (new.req_id, new.block_ids, new.num_computed_tokens) == ("b", [5], 0)
            assert new.prompt_token_ids == list(range(100, 120)) and new.output_token_ids == []
            (cached,) = out.scheduled_cached_reqs
            assert (cached.req_id, cached.new_block_ids, cached.num_computed_tokens) == \
                ("a", [4], 16)
        if len(got) == 4:
            assert [(c.req_id, c.new_block_ids, c.num_computed_tokens)
                    for c in out.scheduled_cached_reqs] == [("a", [6], 20), ("b", [7, 8], 4)]
        assert out.preempted_req_ids == set()
    assert got == expected
    assert [o.finished_req_ids for o in outs] == [set()] * 5 + [{"a"}, set(), set()]
    final = s.schedule()
    assert final.is_empty and final.finished_req_ids == {"b"}
    assert not s.has_unfinished_requests() and s.kv_cache_manager.num_free_blocks == 64


def test_outputs_only_for_sampled_requests() -> None:
    s = make(budget=8)
    s.add_request(req("a", 10, max_tokens=2))
    _, outs = step(s)  # 8 of 10 prompt tokens: nothing sampled, no output
    assert outs == []
    _, outs = step(s)
    assert [(o.req_id, o.new_token_ids, o.finish_reason) for o in outs] == [("a", [1000], None)]
    _, outs = step(s)
    assert [(o.req_id, o.new_token_ids, o.finish_reason) for o in outs] == \
        [("a", [1001], "length")]


def test_max_num_seqs() -> None:
    s = make(seqs=2)
    for rid, mt in (("a", 1), ("b", 5), ("c", 5)):
        s.add_request(req(rid, 4, start=ord(rid) * 10, max_tokens=mt))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"a": 4, "b": 4}
    assert s.get_num_unfinished_requests() == 2  # a finished (max_tokens=1); c waits
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"b": 1, "c": 4}
    assert out.finished_req_ids == {"a"}
    assert [n.req_id for n in out.scheduled_new_reqs] == ["c"]


def test_fcfs_admission_does_not_skip() -> None:
    s = make(blocks=4, caching=False)
    s.add_request(req("r", 8))  # 2 blocks
    s.add_request(req("big", 12, start=50))  # needs 3, only 2 left
    s.add_request(req("small", 2, start=90))  # would fit, but must wait its turn
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"r": 8}
    assert [r.request_id for r in s.waiting] == ["big", "small"]
    assert s.stats() == SchedulerStats(1, 2, 0.5, 0, 0, 0)


def test_preempt_last_admitted_and_resume_with_outputs() -> None:
    s = make(blocks=4, caching=False)
    s.add_request(req("a", 4, max_tokens=6))
    s.add_request(req("b", 4, start=10, max_tokens=50))
    for _ in range(5):  # 8 tokens computed each: all 4 blocks held
        out, _ = step(s)
    kv = s.kv_cache_manager
    assert kv.get_block_ids("a") == [0, 2] and kv.get_block_ids("b") == [1, 3]
    assert s.kv_cache_manager.num_free_blocks == 0

    out, outs = step(s)  # a needs a 3rd block: b (last admitted) is preempted
    assert out.num_scheduled_tokens == {"a": 1}
    assert out.preempted_req_ids == {"b"}
    assert [(c.req_id, c.new_block_ids) for c in out.scheduled_cached_reqs] == [("a", [3])]
    b = s.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == \
        (RequestStatus.PREEMPTED, 0, 1)
    assert list(s.waiting) == [b] and s.stats().num_preemptions == 1
    assert [o.finish_reason for o in outs] == ["length"]  # a reached max_tokens=6

    out, _ = step(s)  # b resumes: recomputes its prompt and its 5 outputs in full
    assert out.finished_req_ids == {"a"} and out.preempted_req_ids == set()
    (new,) = out.scheduled_new_reqs
    assert new.req_id == "b" and out.num_scheduled_tokens == {"b": 9}
    assert new.prompt_token_ids == [10, 11, 12, 13]
    assert new.output_token_ids == [1000, 1001, 1002, 1003, 1004]
    assert new.num_computed_tokens == 0
    # Queue after b's preemption: [1]; then a's blocks freed tail first: [3, 2, 0].
    assert new.block_ids == [1, 3, 2]
    assert b.num_output_tokens == 6 and b.status == RequestStatus.RUNNING


def test_preempted_requests_block_admission_in_same_step() -> None:
    s = make(blocks=4, caching=False)
    s.add_request(req("a", 4))
    s.add_request(req("b", 4, start=10))
    for _ in range(5):
        step(s)
    s.add_request(req("c", 1, start=30))  # would fit in b's freed blocks
    out, _ = step(s)
    assert out.preempted_req_ids == {"b"} and out.num_scheduled_tokens == {"a": 1}
    assert [r.request_id for r in s.waiting] == ["b", "c"]


def test_preempting_itself_stops_the_step() -> None:
    s = make(blocks=2, caching=False)
    s.add_request(req("a", 8))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"a": 8}
    out, _ = step(s)  # a needs a 3rd block and is the only one to preempt
    assert out.is_empty and out.preempted_req_ids == {"a"}
    assert s.kv_cache_manager.num_free_blocks == 2 and list(s.waiting) == [s.requests["a"]]


def test_preempted_request_hits_its_own_cached_blocks() -> None:
    s = make(blocks=4)
    s.add_request(req("a", 4))
    s.add_request(req("b", 4, start=10))
    for _ in range(6):
        out, _ = step(s)
    assert out.preempted_req_ids == {"b"}
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    out, _ = step(s)
    (new,) = out.scheduled_new_reqs
    # b's tail block 3 was evicted first (a took it); its first block 1 is still a hit.
    assert new.req_id == "b" and new.num_computed_tokens == 4
    assert out.num_scheduled_tokens == {"b": 5} and new.block_ids == [1, 3, 2]
    assert s.requests["b"].num_cached_tokens == 0  # recorded at first schedule only


@pytest.mark.parametrize(
    ("params", "tokens", "expect"),
    [
        (dict(), [5, 2, 9], ([5, 2], "stop", None)),
        (dict(ignore_eos=True, max_tokens=3), [2, 2, 2, 2], ([2, 2, 2], "length", None)),
        (dict(stop_token_ids=[7]), [5, 7, 9], ([5, 7], "stop", 7)),
        (dict(min_tokens=2), [2, 7, 2, 9], ([2, 7, 2], "stop", None)),
        (dict(min_tokens=2, stop_token_ids=[7]), [7, 7, 7], ([7, 7, 7], "stop", 7)),
        (dict(max_tokens=2), [5, 6, 7], ([5, 6], "length", None)),
        (dict(max_tokens=100), [5] * 10, ([5] * 4, "length", None)),  # max_model_len 10
    ],
)
def test_stop_conditions(params: dict, tokens: list[int],
                         expect: tuple[list[int], str, int | None]) -> None:
    s = make(max_len=10)
    r = req("a", 6, eos=frozenset({2}), **params)
    s.add_request(r)
    it = iter(tokens)
    emitted: list[int] = []
    last: EngineCoreOutput | None = None
    while s.has_unfinished_requests():
        _, outs = step(s, lambda _r: [next(it)])
        for o in outs:
            emitted += o.new_token_ids
            last = o
    assert last is not None
    assert (emitted, last.finish_reason, last.stop_reason) == expect
    assert r.output_token_ids == expect[0] and s.kv_cache_manager.num_free_blocks == 64


def test_multi_token_step_truncates_at_stop() -> None:
    s = make()
    s.add_request(req("a", 3, stop_token_ids=[7]))
    out = s.schedule()
    lp = Logprobs([[5], [7], [9]], [[-0.1], [-0.2], [-0.3]], [1, 1, 1])
    (o,) = s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [5, 7, 9]},
                                                  logprobs={"a": lp}))
    assert (o.new_token_ids, o.finish_reason, o.stop_reason) == ([5, 7], "stop", 7)
    assert o.new_logprobs == Logprobs([[5], [7]], [[-0.1], [-0.2]], [1, 1])


def test_prompt_logprobs_chunk_is_emitted_without_tokens() -> None:
    s = make(budget=4)
    s.add_request(req("a", 10, prompt_logprobs=0))
    out = s.schedule()
    plp = Logprobs([[1], [2], [3], [4]], [[-1.0]] * 4, [1] * 4)
    (o,) = s.update_from_output(out, RunnerOutput(prompt_logprobs={"a": plp}))
    assert (o.req_id, o.new_token_ids, o.prompt_logprobs, o.finish_reason) == \
        ("a", [], plp, None)


def test_abort_frees_blocks_at_once() -> None:
    s = make(budget=8, blocks=16)
    s.add_request(req("run", 8))
    s.add_request(req("wait", 8, start=50))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"run": 8}
    assert s.kv_cache_manager.num_free_blocks == 14
    s.finish_requests(["run", "wait", "nope"], RequestStatus.FINISHED_ABORTED)
    s.finish_requests("run", RequestStatus.FINISHED_ABORTED)  # already gone: ignored
    assert s.kv_cache_manager.num_free_blocks == 16 and s.kv_cache_manager.usage == 0.0
    assert not s.has_unfinished_requests() and s.get_num_unfinished_requests() == 0
    out = s.schedule()
    # Only the request the runner holds is reported; "wait" was never sent to it.
    assert out.is_empty and out.finished_req_ids == {"run"}
    assert s.schedule().finished_req_ids == set()
    with pytest.raises(ValueError):
        s.finish_requests("x", RequestStatus.RUNNING)


def test_abort_between_schedule_and_update_is_skipped() -> None:
    s = make()
    s.add_request(req("a", 4))
    out = s.schedule()
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert s.update_from_output(out, RunnerOutput(sampled_token_ids={"a": [1]})) == []


def test_prefix_hits_and_siblings() -> None:
    s = make(budget=64)
    s.add_request(req("a", 10, max_tokens=1))
    step(s)
    s.add_request(req("b", 10, max_tokens=1))
    out, outs = step(s)
    (new,) = out.scheduled_new_reqs
    assert (new.num_computed_tokens, new.block_ids) == (8, [0, 1, 3])
    assert out.num_scheduled_tokens == {"b": 2}
    assert outs[0].num_cached_tokens == 8
    # n=2 siblings added together: the second hits what the first cached this step.
    s.add_request(req("s0", 13, start=200, max_tokens=4))
    s.add_request(req("s1", 13, start=200, max_tokens=4))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"s0": 13, "s1": 1}
    b0, b1 = (s.kv_cache_manager.get_blocks(r) for r in ("s0", "s1"))
    assert [b.block_id for b in b0[:3]] == [b.block_id for b in b1[:3]]
    assert [b.ref_cnt for b in b0] == [2, 2, 2, 1] and b1[3].ref_cnt == 1
    assert s.requests["s1"].num_cached_tokens == 12
    st = s.stats()
    assert (st.prefix_cache_queries, st.prefix_cache_hits) == (10 + 10 + 13 + 13, 8 + 12)


def test_add_request_validation() -> None:
    s = make(max_len=8)
    s.add_request(req("a", 8))
    with pytest.raises(ValueError, match="duplicate"):
        s.add_request(req("a", 2))
    with pytest.raises(ValueError, match="max_model_len"):
        s.add_request(req("b", 9))


def test_prompt_logprobs_not_reemitted_after_preemption() -> None:
    s = make(budget=8, blocks=3)
    s.add_request(req("x", 4, start=50, max_tokens=2))
    s.add_request(req("p", 10, prompt_logprobs=0))

    def step_with_prompt_lp() -> tuple[SchedulerOutput, dict[str, list[int]]]:
        out = s.schedule()
        plp, sampled = {}, {}
        for rid, n in out.num_scheduled_tokens.items():
            r = s.requests[rid]
            start = r.num_computed_tokens - n
            # Like the runner: position i scores token i + 1, up to the last prompt token.
            pos = list(range(start, min(start + n, r.num_prompt_tokens - 1)))
            if r.sampling_params.prompt_logprobs is not None and pos:
                plp[rid] = Logprobs([[p] for p in pos], [[-1.0] for _ in pos], [1] * len(pos))
            if r.num_computed_tokens >= r.num_tokens:
                sampled[rid] = [7]
        outs = s.update_from_output(out, RunnerOutput(sampled, prompt_logprobs=plp))
        return out, {o.req_id: [t[0] for t in o.prompt_logprobs.token_ids]
                     for o in outs if o.prompt_logprobs is not None}

    out, emitted = step_with_prompt_lp()
    assert out.num_scheduled_tokens == {"x": 4, "p": 4} and emitted == {"p": [0, 1, 2, 3]}
    out, emitted = step_with_prompt_lp()  # p needs 2 more blocks: preempts itself
    assert out.preempted_req_ids == {"p"} and emitted == {}
    out, emitted = step_with_prompt_lp()  # recomputes [0, 8): only 4..7 are new
    assert out.num_scheduled_tokens == {"p": 8} and emitted == {"p": [4, 5, 6, 7]}
    out, emitted = step_with_prompt_lp()
    assert out.num_scheduled_tokens == {"p": 2} and emitted == {"p": [8]}
    assert s.requests["p"].output_token_ids == [7]
