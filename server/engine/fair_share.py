"""How the scheduler shares slots and prompt tokens between priorities and tenants.

Functions over the scheduler's running list (sorted by priority, then admission) and the
tenant book (request_queue.py): whom to preempt for the request the queue picks next or
when KV runs out, and how many prompt tokens each tenant may compute in a step. They
read the KV cache manager but change nothing: the scheduler acts on their answers.
"""

from __future__ import annotations

from collections.abc import Callable

from server.engine.kv_cache_manager import KVCacheManager
from server.engine.request_queue import TenantBook
from server.request import Request


def make_room(head: Request, running: list[Request], tenants: TenantBook, kv: KVCacheManager,
              max_num_seqs: int, budget: int, max_model_len: int,
              threshold: int) -> tuple[int, list[Request]]:
    """The size of `head`'s first chunk (0: it cannot get in this step) and the running
    requests to preempt first so that it gets a slot and the KV blocks for that chunk."""
    slots_full = len(running) >= max_num_seqs
    if (slots_full and tenants.num_active < 2
            and (not running or running[-1].priority <= head.priority)):
        return 0, []  # nobody it may preempt: skip the prefix lookup
    hits, num_hit_tokens = kv.get_computed_blocks(head)
    chunk = min(head.num_tokens, max_model_len) - num_hit_tokens
    if threshold:
        chunk = min(chunk, threshold)
    chunk = min(chunk, budget)
    bs = kv.block_size
    need = (-(-(num_hit_tokens + chunk) // bs) - len(hits)
            + sum(1 for b in hits if b.ref_cnt == 0))  # free hits leave the free queue too
    blocks_short = need - kv.num_free_blocks
    if not slots_full and blocks_short <= 0:
        return chunk, []

    def blocks_freed(r: Request) -> int:
        return sum(1 for b in kv.get_blocks(r.request_id) if b.ref_cnt == 1)

    victims = pick_victims(head, running, tenants, max_num_seqs, blocks_short, blocks_freed)
    return (chunk, victims) if victims else (0, [])


def pick_victims(head: Request, running: list[Request], tenants: TenantBook, max_num_seqs: int,
                 blocks_short: int, blocks_freed: Callable[[Request], int]) -> list[Request]:
    """Running requests to preempt so `head` gets a slot and `blocks_short` KV blocks, or
    [] when the rules do not allow enough of them (then nobody is preempted).

    `running` is sorted by priority then admission, so its tail is the worst and latest.
    """
    counts = {t: s.running for t, s in tenants.states.items() if s.running}
    victims: list[Request] = []
    freed = 0
    while len(running) - len(victims) >= max_num_seqs or freed < blocks_short:
        victim = _victim(head, running, tenants, victims, counts)
        if victim is None:
            return []
        victims.append(victim)
        counts[victim.tenant] -= 1
        freed += blocks_freed(victim)
    return victims


def _victim(head: Request, running: list[Request], tenants: TenantBook, chosen: list[Request],
            counts: dict[str | None, int]) -> Request | None:
    # A worse class than the head's priority, latest admitted first. The class is the one
    # a request was admitted at, so a request that aged its way in is not pushed out again
    # by newcomers of the class it reached.
    if running and running[-1].priority > head.priority:
        for r in reversed(running):
            if r.priority <= head.priority:
                break
            if r.effective_priority > head.priority and r not in chosen:
                return r
    if tenants.num_active < 2:
        return None
    # The tenant most over its weighted share of slots, while it stays at least as far
    # over as the head's tenant would be after the swap (so a swap never reverses).
    states = tenants.states
    over = max((t for t, n in counts.items() if n and t != head.tenant),
               key=lambda t: counts[t] / states[t].weight, default=None)
    if over is None:
        return None
    after_mine = (counts.get(head.tenant, 0) + 1) / states[head.tenant].weight
    if (counts[over] - 1) / states[over].weight < after_mine:
        return None
    for r in reversed(running):
        if r.tenant == over and r.priority >= head.priority and r not in chosen:
            return r
    return None


def kv_victim(running: list[Request], start: int, tenants: TenantBook,
              admission: Callable[[Request], int]) -> Request:
    """Whom to preempt when running[start] needs KV blocks that are not free.

    One of running[start:] (the rest were scheduled this step already): the worst class it
    was admitted at, then the tenant most over its share of slots, then the latest
    admitted (the least work lost). With one tenant and one priority: the last one.
    """
    last = running[-1]
    if tenants.num_active < 2 and running[start].priority == last.priority:
        return last
    states = tenants.states

    def badness(r: Request) -> tuple[int, float, int]:
        state = states[r.tenant]
        return r.effective_priority, state.running / state.weight, admission(r)

    return max(running[start:], key=badness)


def prefill_caps(running: list[Request], head: Request | None, head_chunk: int,
                 tenants: TenantBook, budget: int, prompt_floor: int, max_model_len: int,
                 threshold: int) -> dict[str | None, int] | None:
    """Prompt tokens each tenant may compute this step, or None for no caps.

    Decodes come first (1 token each, but they leave `prompt_floor`); what is left is split
    by weight over the tenants with prompt work (running prefills, and the head's first
    chunk), max-min fair: a tenant that needs less than its share gets what it needs and
    the rest is re-split. Only computed when two or more tenants want prompt tokens.
    """
    demand: dict[str | None, int] = {}
    decodes = 0
    for r in running:
        left = min(r.num_tokens, max_model_len) - r.num_computed_tokens
        if left > 1:
            if threshold:
                left = min(left, threshold)
            demand[r.tenant] = demand.get(r.tenant, 0) + left
        elif left == 1:
            decodes += 1
    if head is not None:
        demand[head.tenant] = demand.get(head.tenant, 0) + head_chunk
    if len(demand) < 2:
        return None
    states = tenants.states
    return water_fill(max(budget - decodes, prompt_floor), demand,
                      {t: states[t].weight for t in demand})


def water_fill(total: int, demand: dict[str | None, int],
               weights: dict[str | None, float]) -> dict[str | None, int]:
    """Weighted max-min fair split of `total` (whole tokens, rounded down)."""
    caps: dict[str | None, int] = {}
    left = dict(demand)
    while left:
        wsum = sum(weights[t] for t in left)
        fits = [t for t, d in left.items() if d <= total * weights[t] / wsum]
        if not fits:
            for t in left:
                caps[t] = int(total * weights[t] / wsum)
            break
        for t in fits:
            caps[t] = left.pop(t)
            total -= caps[t]
    return caps
