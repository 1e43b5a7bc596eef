"""Fair scheduling: tenants by weight, priority with aging, budget reserves, exact steps.

Scheduler-level with a fake runner (a request samples one token in the step its computed
tokens reach all its tokens), like tests/test_scheduler.py.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from server.config import CacheConfig, SchedulerConfig
from server.engine.outputs import EngineCoreOutput, RunnerOutput, SchedulerOutput
from server.engine.request_queue import TenantBook, WaitingQueue
from server.engine.scheduler import Scheduler
from server.request import Request, RequestStatus
from server.sampling_params import SamplingParams


def make(budget: int = 64, seqs: int = 8, max_len: int = 128, bs: int = 4,
         blocks: int = 1024, threshold: int = 0, aging: int = 100) -> Scheduler:
    cfg = SchedulerConfig(seqs, budget, max_len, long_prefill_token_threshold=threshold,
                          priority_aging_steps=aging)
    return Scheduler(cfg, CacheConfig(block_size=bs), blocks)


def req(rid: str, n: int, start: int = 0, *, tenant: str | None = None, weight: float = 1.0,
        priority: int = 0, max_tokens: int = 32) -> Request:
    return Request(rid, list(range(start, start + n)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   priority=priority, tenant=tenant, tenant_weight=weight)


def step(s: Scheduler) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = s.schedule()
    sampled = {}
    for rid in out.num_scheduled_tokens:
        r = s.requests[rid]
        if r.num_computed_tokens >= r.num_tokens:
            sampled[rid] = [1000 + r.num_output_tokens]
    return out, s.update_from_output(out, RunnerOutput(sampled_token_ids=sampled))


def flood(s: Scheduler, tenant: str, count: int, weight: float = 1.0, max_tokens: int = 32,
          start: int = 0) -> None:
    for i in range(count):
        s.add_request(req(f"{tenant}{i}", 16, start + i % 50, tenant=tenant, weight=weight,
                          max_tokens=max_tokens))


def steps_to_first_token(s: Scheduler, rid: str, limit: int = 2000) -> int:
    for n in range(1, limit + 1):
        _, outs = step(s)
        if any(o.req_id == rid and o.new_token_ids for o in outs):
            return n
    raise AssertionError(f"{rid} got no token in {limit} steps")


def test_flood_does_not_delay_another_tenant() -> None:
    s = make()
    flood(s, "a", 200)
    for _ in range(5):  # a0..a7 fill the 8 slots and decode
        step(s)
    assert [r.request_id for r in s.running] == [f"a{i}" for i in range(8)]
    s.add_request(req("b", 16, 400, tenant="b"))
    out, outs = step(s)
    # b gets in at once: a's latest admitted request makes room, b's prompt fits the step.
    assert out.preempted_req_ids == {"a7"}
    assert out.num_scheduled_tokens == {**{f"a{i}": 1 for i in range(7)}, "b": 16}
    assert [o.req_id for o in outs] == [f"a{i}" for i in range(7)] + ["b"]
    assert s.num_preemptions == 1
    # No ping-pong: a stays at 7 running while b runs, and a keeps decoding every step.
    a_tokens = 0
    for _ in range(31):
        out, outs = step(s)
        assert out.preempted_req_ids == set()
        a_tokens += sum(len(o.new_token_ids) for o in outs if o.req_id.startswith("a"))
    # a0..a6 end after 32 tokens; a7 (resumed) and a8 take their slots and sample at once.
    assert a_tokens == 7 * 31
    assert "b" not in s.requests and s.num_preemptions == 1


def test_single_tenant_flood_stays_fcfs() -> None:
    """The same arrival from the flooding tenant itself waits its turn (no preemption)."""
    s = make()
    flood(s, "a", 200)
    for _ in range(5):
        step(s)
    s.add_request(req("late", 16, 400, tenant="a"))
    # Behind the 192 queued before it, 8 at a time, each 32 tokens long.
    assert steps_to_first_token(s, "late") == 796
    assert s.num_preemptions == 0


@pytest.mark.parametrize("weights", [(2.0, 1.0), (1.0, 1.0), (3.0, 1.0)])
def test_tokens_split_by_weight(weights: tuple[float, float]) -> None:
    wa, wb = weights
    s = make(seqs=12)
    for i in range(300):  # interleaved arrivals, both tenants always backlogged
        s.add_request(req(f"a{i}", 16, i % 50, tenant="a", weight=wa, max_tokens=64))
        s.add_request(req(f"b{i}", 16, 100 + i % 50, tenant="b", weight=wb, max_tokens=64))
    served: Counter[str] = Counter()
    for _ in range(600):
        _, outs = step(s)
        for o in outs:
            served[o.req_id[0]] += len(o.new_token_ids)
    # Slots split 12 * w / (wa + wb): 8:4, 6:6, 9:3; output tokens follow within 2%.
    assert s.tenants.states["a"].running / s.tenants.states["b"].running == wa / wb
    assert served["a"] / served["b"] == pytest.approx(wa / wb, rel=0.02)
    assert s.num_preemptions == 0  # the queue admits by share, so no correction is needed


def test_late_heavier_tenant_takes_its_share_by_preemption() -> None:
    s = make(seqs=6)
    flood(s, "a", 50, max_tokens=100)
    for _ in range(3):
        step(s)
    assert s.tenants.states["a"].running == 6
    flood(s, "b", 50, weight=2.0, max_tokens=100, start=100)
    preempted: list[str] = []
    for _ in range(6):
        out, _ = step(s)
        preempted += sorted(out.preempted_req_ids)
    # b's share is 4 of 6 slots: one swap per step, a's latest admitted first. A swap needs
    # a's slots per weight after it, (a - 1) / 1, to stay >= b's, (b + 1) / 2: true down
    # to a = 3, b = 3 (2 >= 2), false at a = 2, b = 4 (1 < 2.5).
    assert preempted == ["a5", "a4", "a3", "a2"]
    assert (s.tenants.states["a"].running, s.tenants.states["b"].running) == (2, 4)


def test_priority_order_lower_first_fcfs_within() -> None:
    s = make(seqs=1)
    for rid, prio in (("p3", 3), ("p1", 1), ("p2", 2), ("p1b", 1), ("p0", 0)):
        s.add_request(req(rid, 4, priority=prio, max_tokens=1))
    assert [r.request_id for r in s.waiting] == ["p0", "p1", "p1b", "p2", "p3"]
    order = []
    while s.has_unfinished_requests():
        out, _ = step(s)
        order += [n.req_id for n in out.scheduled_new_reqs]
    assert order == ["p0", "p1", "p1b", "p2", "p3"]


def test_higher_priority_preempts_lowest_latest() -> None:
    s = make(seqs=2)
    s.add_request(req("low5", 4, priority=5, max_tokens=50))
    s.add_request(req("low3", 4, 10, priority=3, max_tokens=50))
    step(s)
    assert [r.request_id for r in s.running] == ["low3", "low5"]  # sorted by priority
    s.add_request(req("urgent", 4, 20, priority=0, max_tokens=2))
    out, outs = step(s)
    assert out.preempted_req_ids == {"low5"}
    assert out.num_scheduled_tokens == {"low3": 1, "urgent": 4}
    assert [r.request_id for r in s.running] == ["urgent", "low3"]
    step(s)  # urgent's 2nd token: it finishes
    out, _ = step(s)
    (resumed,) = out.scheduled_new_reqs
    # Its first block (prompt 4 tokens) is still cached; it recomputes its 1 output token.
    assert (resumed.req_id, resumed.num_computed_tokens) == ("low5", 4)
    assert out.num_scheduled_tokens["low5"] == 1
    # An equal or worse class never preempts.
    s.add_request(req("same", 4, 30, priority=5))
    s.add_request(req("worse", 4, 40, priority=9))
    for _ in range(3):
        out, _ = step(s)
        assert out.preempted_req_ids == set()
    assert s.num_preemptions == 1


def test_aging_admits_low_priority_under_constant_high_priority_stream() -> None:
    s = make(seqs=1, aging=4)
    s.add_request(req("low", 4, 100, priority=2, max_tokens=3))
    admitted_at = None
    for k in range(1, 20):
        s.add_request(req(f"hi{k}", 4, k, priority=0, max_tokens=1))
        out, _ = step(s)
        if [n.req_id for n in out.scheduled_new_reqs] == ["low"]:
            admitted_at = k
            break
    # Step k: low has waited k steps, class 2 - k // 4; at k = 8 it ties with class 0 and
    # wins on arrival order.
    assert admitted_at == 8
    assert s.requests["low"].effective_priority == 0
    # Admitted at class 0, it is not preempted by later class-0 arrivals.
    for k in range(20, 23):
        s.add_request(req(f"hi{k}", 4, k, priority=0, max_tokens=1))
        out, _ = step(s)
        assert out.preempted_req_ids == set()
    assert "low" not in s.requests


def test_aging_off_keeps_strict_priority() -> None:
    s = make(seqs=1, aging=0)
    s.add_request(req("low", 4, 100, priority=2, max_tokens=1))
    for k in range(1, 40):
        s.add_request(req(f"hi{k}", 4, k, priority=0, max_tokens=1))
        out, _ = step(s)
        assert [n.req_id for n in out.scheduled_new_reqs] == [f"hi{k}"]


def test_long_prefill_threshold_caps_chunks_while_others_run() -> None:
    s = make(budget=64, threshold=16)
    s.add_request(req("long", 100, max_tokens=4))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"long": 64}  # alone: no cap
    s.add_request(req("short", 8, 200, max_tokens=4))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"long": 16, "short": 8}
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"long": 16, "short": 1}


def test_threshold_off_long_prompt_takes_the_budget() -> None:
    s = make(budget=64, max_len=512)
    s.add_request(req("long", 200, max_tokens=4))
    step(s)
    s.add_request(req("short", 8, 300, max_tokens=4))
    out, _ = step(s)
    assert out.num_scheduled_tokens == {"long": 64}  # same tenant: FCFS, as before


def test_other_tenants_prompt_gets_its_share_next_to_a_long_prefill() -> None:
    s = make(budget=64, max_len=512)
    s.add_request(req("long", 200, tenant="a", max_tokens=4))
    step(s)
    s.add_request(req("short", 40, 300, tenant="b", max_tokens=4))
    out, _ = step(s)
    # b's share of the budget against a's running request is 1/2: 32 of its 40 tokens.
    assert out.num_scheduled_tokens == {"long": 32, "short": 32}
    out, outs = step(s)
    assert out.num_scheduled_tokens == {"long": 56, "short": 8}
    assert [o.req_id for o in outs] == ["short"]


def test_decoders_filling_the_budget_leave_room_for_a_prompt() -> None:
    s = make(budget=16, seqs=32)
    for i in range(16):
        s.add_request(req(f"d{i}", 1, i, max_tokens=100))
    step(s)
    s.add_request(req("p", 8, 100, max_tokens=4))
    # Decodes leave budget // 8 = 2 tokens: p's 8 prompt tokens take 4 steps, while the
    # last two decoders wait each of those steps.
    counts = []
    for _ in range(4):
        out, _ = step(s)
        counts.append(out.num_scheduled_tokens.get("p", 0))
        assert sum(out.num_scheduled_tokens.values()) == 16
    assert counts == [2, 2, 2, 2]
    assert s.requests["p"].num_output_tokens == 1


def test_abort_waiting_requests_of_several_queues() -> None:
    s = make(seqs=1)
    s.add_request(req("run", 4, max_tokens=50))
    step(s)
    for rid, tenant, prio in (("w1", "a", 0), ("w2", "b", 0), ("w3", "a", 1), ("w4", "a", 0)):
        s.add_request(req(rid, 4, 10, tenant=tenant, priority=prio))
    s.finish_requests(["w1", "w3"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in s.waiting] == ["w2", "w4"] and len(s.waiting) == 2
    assert s.tenants.states["a"].unfinished == 1 and s.tenants.num_active == 3


def test_queue_tenant_turning_active_gets_no_credit_for_idling() -> None:
    tenants = TenantBook()
    q = WaitingQueue(tenants, aging_steps=0)
    r1 = req("x1", 4, tenant="x")
    tenants.add(r1)
    q.add(r1)
    tenants.charge("x", 100)
    r2 = req("y1", 4, tenant="y", weight=4.0)
    tenants.add(r2)
    q.add(r2)
    assert tenants.states["y"].vtime == 100.0  # starts at the least active virtual time
    tenants.charge("y", 40)  # 40 tokens at weight 4: 10 of virtual time
    assert tenants.states["y"].vtime == 110.0
    assert q.peek() is r1  # equal slots (none), x has less virtual time
    q.admit(r1)
    assert q.peek() is r2 and list(q) == [r2]
    r3 = req("y2", 4, tenant="y")
    q.add(r3)
    q.admit(r3)  # not at the head (an abort race): removed all the same
    assert list(q) == [r2] and len(q) == 1


def test_kv_pressure_preempts_the_over_share_tenant_not_the_last_admitted() -> None:
    s = make(bs=4, blocks=8)
    for rid in ("a1", "a2", "a3"):
        s.add_request(req(rid, 4, 10 * int(rid[1]), tenant="a", max_tokens=50))
    step(s)
    s.add_request(req("b1", 4, 90, tenant="b", max_tokens=50))
    preempted = []
    for _ in range(5):
        out, _ = step(s)
        preempted.append(sorted(out.preempted_req_ids))
    # All 8 blocks are held from step 3; at step 6 a1 needs a 3rd block: tenant a (3
    # running) gives up its latest, a3, though b1 was admitted after it.
    assert preempted == [[], [], [], [], ["a3"]]
    assert [r.request_id for r in s.running] == ["a1", "a2", "b1"]


@pytest.mark.parametrize("seed", range(8))
def test_random_tenants_and_priorities_keep_invariants_and_finish(seed: int) -> None:
    """Mixed tenants, weights, priorities, aborts and KV pressure: budgets and slots hold,
    nothing is scheduled and preempted at once, the books match, and everything ends."""
    rng = random.Random(seed)
    budget, seqs = rng.choice([8, 32, 128]), rng.choice([2, 4, 16])
    s = make(budget=budget, seqs=seqs, blocks=rng.choice([24, 64, 400]), aging=8,
             threshold=rng.choice([0, 0, 5]))
    n = 0
    for _ in range(3000):
        for _ in range(rng.choice([0, 0, 0, 1, 3])) if n < 150 else ():
            n += 1
            tenant = rng.choice(["a", "b", "c", None])
            s.add_request(req(f"r{n}", rng.randint(1, 60), rng.choice([0, 500]), tenant=tenant,
                              weight={"a": 1.0, "b": 2.0, "c": 0.5, None: 1.0}[tenant],
                              priority=rng.choice([0, 0, 1, 5]), max_tokens=rng.randint(1, 30)))
        if rng.random() < 0.02 and s.requests:
            s.finish_requests(rng.choice(sorted(s.requests)), RequestStatus.FINISHED_ABORTED)
        out, _ = step(s)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values()) <= budget
        assert len(s.running) <= seqs
        assert not set(out.num_scheduled_tokens) & out.preempted_req_ids
        running = Counter(r.tenant for r in s.running)
        assert {t: st.running for t, st in s.tenants.states.items() if st.running} == running
        assert [r.priority for r in s.running] == sorted(r.priority for r in s.running)
        if not s.has_unfinished_requests() and n >= 150:
            break
    assert not s.has_unfinished_requests() and n >= 150
    assert s.kv_cache_manager.num_free_blocks == s.kv_cache_manager.pool.num_blocks
    assert s.tenants.num_active == 0 and len(s.waiting) == 0


def test_decoders_filling_the_budget_leave_room_for_two_tenants_prompts() -> None:
    s = make(budget=16, seqs=32, max_len=256)
    for i in range(15):
        s.add_request(req(f"d{i}", 1, i, tenant="a", max_tokens=100))
    s.add_request(req("long", 100, 200, tenant="a", max_tokens=4))
    step(s)  # 15 decoders' prompts + 1 token of long's
    s.add_request(req("p", 8, 100, tenant="b", max_tokens=4))
    out, _ = step(s)
    # Decodes leave budget // 8 = 2 tokens, split by weight between a's prefill and b's.
    assert out.num_scheduled_tokens == {**{f"d{i}": 1 for i in range(14)}, "long": 1, "p": 1}


def test_water_fill_is_weighted_max_min_fair() -> None:
    from server.engine.fair_share import water_fill

    weights = {"a": 2.0, "b": 1.0, "c": 1.0}
    # b needs less than its quarter: it gets 10, a and c split the other 54 by 2:1.
    assert water_fill(64, {"a": 100, "b": 10, "c": 100}, weights) == {"b": 10, "a": 36, "c": 18}
    assert water_fill(64, {"a": 5, "b": 10, "c": 20}, weights) == {"a": 5, "b": 10, "c": 20}
    assert water_fill(10, {"a": 100, "c": 100}, weights) == {"a": 6, "c": 3}  # rounded down
