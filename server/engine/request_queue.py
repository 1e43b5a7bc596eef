"""Who is admitted next: priority with aging, weighted fair between tenants, FCFS.

Waiting requests sit in one FIFO per (tenant, priority). The next request is the head of
the FIFO with, in order:
  1. the lowest effective priority: its priority minus one class per `aging_steps` steps
     the head has waited since it arrived, so a low priority cannot starve;
  2. the fewest running requests per unit of weight (slots shared by weight; the same
     measure the scheduler preempts by, so admission never undoes a preemption);
  3. the least service: the tenant's virtual time, tokens scheduled / weight (start-time
     fair queuing: a tenant that turns active starts at the least virtual time of the
     active ones);
  4. arrival order.
A preempted request goes back to the front of its FIFO and keeps its arrival, so with
one tenant and one priority this is exactly FCFS with preempted requests first.

Only heads are compared, so a pick costs one comparison per non-empty FIFO, not one per
waiting request; a head is its FIFO's oldest request but for the order preempted ones
come back in, which is FCFS's (last preempted first).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from server.request import Request

_Key = tuple[str | None, int]


@dataclass
class TenantState:
    weight: float = 1.0
    unfinished: int = 0  # waiting or running
    running: int = 0
    vtime: float = 0.0  # tokens scheduled / weight


class TenantBook:
    """Per-tenant weight, request counts and virtual time; None is the default tenant."""

    def __init__(self) -> None:
        self.states: dict[str | None, TenantState] = {}
        self.num_active = 0  # tenants with unfinished requests

    def get(self, tenant: str | None) -> TenantState:
        state = self.states.get(tenant)
        return state if state is not None else TenantState()

    def add(self, request: Request) -> None:
        state = self.states.get(request.tenant)
        if state is None:
            state = self.states[request.tenant] = TenantState()
        if state.unfinished == 0:
            # Start level with the least served active tenant: no credit for idling, and
            # no debt either (virtual times are only charged while two or more tenants
            # are active, so an old one may be stale).
            active = [s.vtime for s in self.states.values() if s.unfinished]
            if active:
                state.vtime = min(active)
            self.num_active += 1
        state.weight = request.tenant_weight
        state.unfinished += 1

    def finish(self, request: Request, was_running: bool) -> None:
        state = self.states[request.tenant]
        state.unfinished -= 1
        state.running -= was_running
        if state.unfinished == 0:
            self.num_active -= 1

    def charge(self, tenant: str | None, tokens: int) -> None:
        state = self.states[tenant]
        state.vtime += tokens / state.weight


class WaitingQueue:
    """Waiting requests; iteration yields them in the order they would be picked now."""

    def __init__(self, tenants: TenantBook, aging_steps: int) -> None:
        self.tenants = tenants
        self.aging_steps = aging_steps
        # Engine steps so far: the clock aging is measured in (deterministic, unlike time).
        self.step = 0
        self._fifos: dict[_Key, deque[Request]] = {}
        self._len = 0
        # Per unfinished request: arrival order and the step it arrived at.
        self._seq: dict[str, int] = {}
        self._since: dict[str, int] = {}
        self._next_seq = 0
        self._admitted: dict[str, int] = {}
        self._next_admission = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Request]:
        """Current pick order (virtual times as they are now)."""
        pos = {key: 0 for key in self._fifos}
        for _ in range(self._len):
            key = min((k for k in pos if pos[k] < len(self._fifos[k])),
                      key=lambda k: self._rank(k, self._fifos[k][pos[k]]))
            yield self._fifos[key][pos[key]]
            pos[key] += 1

    def admission_order(self, request: Request) -> int:
        """When the request last left the queue for the running batch (a counter)."""
        return self._admitted[request.request_id]

    def effective_priority(self, request: Request) -> int:
        if not self.aging_steps:
            return request.priority
        waited = self.step - self._since.get(request.request_id, self.step)
        return request.priority - waited // self.aging_steps

    def _rank(self, key: _Key, head: Request) -> tuple[int, float, float, int]:
        state = self.tenants.get(key[0])
        return (self.effective_priority(head), state.running / state.weight, state.vtime,
                self._seq[head.request_id])

    def peek(self) -> Request | None:
        """The request to admit next, or None when nothing waits."""
        fifos = self._fifos
        if len(fifos) == 1:
            return next(iter(fifos.values()))[0]
        if not fifos:
            return None
        key = min(fifos, key=lambda k: self._rank(k, fifos[k][0]))
        return fifos[key][0]

    def add(self, request: Request) -> None:
        """A new request: joins the back of its FIFO."""
        rid = request.request_id
        self._seq[rid] = self._next_seq
        self._next_seq += 1
        self._since[rid] = self.step
        self._fifo(request).append(request)
        self._len += 1

    def add_preempted(self, request: Request) -> None:
        """Back to the front of its FIFO, keeping its arrival (and so its age)."""
        self._fifo(request).appendleft(request)
        self._len += 1

    def admit(self, request: Request) -> None:
        """`request` is admitted: remove it, usually the head of its FIFO (as peek() gives)."""
        self._admitted[request.request_id] = self._next_admission
        self._next_admission += 1
        key = (request.tenant, request.priority)
        fifo = self._fifos[key]
        if fifo[0] is request:
            fifo.popleft()
        else:
            fifo.remove(request)
        if not fifo:
            del self._fifos[key]
        self._len -= 1

    def remove(self, requests: Iterable[Request]) -> None:
        """Drop waiting requests from anywhere in the queue (aborts)."""
        gone: dict[_Key, set[str]] = {}
        for r in requests:
            gone.setdefault((r.tenant, r.priority), set()).add(r.request_id)
        for key, ids in gone.items():
            fifo = self._fifos.get(key)
            if fifo is None:
                continue
            kept = deque(r for r in fifo if r.request_id not in ids)
            self._len -= len(fifo) - len(kept)
            if kept:
                self._fifos[key] = kept
            else:
                del self._fifos[key]

    def forget(self, request_id: str) -> None:
        """The request finished: drop its arrival record."""
        self._seq.pop(request_id, None)
        self._since.pop(request_id, None)
        self._admitted.pop(request_id, None)

    def _fifo(self, request: Request) -> deque[Request]:
        key = (request.tenant, request.priority)
        fifo = self._fifos.get(key)
        if fifo is None:
            fifo = self._fifos[key] = deque()
        return fifo
