"""The engine loop: schedule -> run -> update. Owns the scheduler and the runner.

This module never imports torch itself: the runner is built by `server.engine_factory`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Protocol

from server.engine.outputs import (
    EngineCoreOutput,
    NewRequestData,
    RequestTimes,
    RunnerOutput,
    SchedulerOutput,
)
from server.engine.scheduler import Scheduler, SchedulerStats
from server.request import Request, RequestStatus


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> RunnerOutput: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`clock` must be the clock of the requests' arrival times (tests inject one)."""
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock
        # Timestamps of each sequence scheduled at least once and not yet finished; they
        # ride on its first-token and final outputs (the front end's timing histograms).
        self._times: dict[str, RequestTimes] = {}

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)
        self._forget_times(req_ids)

    def stop_requests(self, req_ids: list[str]) -> None:
        """Finish requests that hit a stop string (detected on the detokenized text)."""
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_STOPPED)
        self._forget_times(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.scheduled_new_reqs:
            self._stamp_scheduled(sched.scheduled_new_reqs)
        if sched.is_empty:
            # Still let the runner drop finished requests' state.
            self.executor.execute(sched)
            return []
        runner_out = self.executor.execute(sched)
        outputs = self.scheduler.update_from_output(sched, runner_out)
        if outputs:
            self._stamp_outputs(outputs)
        return outputs

    def _stamp_scheduled(self, new_reqs: list[NewRequestData]) -> None:
        """First scheduling only: a request resumed after preemption is sent in full
        again, but its queue time ended when it was first admitted."""
        now = self.clock()
        times, requests = self._times, self.scheduler.requests
        for nr in new_reqs:
            if nr.req_id not in times and (r := requests.get(nr.req_id)) is not None:
                times[nr.req_id] = RequestTimes(r.arrival_time, now)

    def _stamp_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        now = self.clock()
        times = self._times
        for o in outputs:
            t = times.get(o.req_id)
            if t is None:
                continue
            if t.first_token is None and o.new_token_ids:
                t = times[o.req_id] = dataclasses.replace(t, first_token=now)
                o.times = t
            if o.finish_reason is not None:
                o.times = dataclasses.replace(t, finished=now)
                del times[o.req_id]

    def _forget_times(self, req_ids: list[str]) -> None:
        for req_id in req_ids:
            self._times.pop(req_id, None)
