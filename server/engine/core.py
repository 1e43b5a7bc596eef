"""The engine loop: schedule -> run -> update. Owns the scheduler and the runner.

This module never imports torch itself: the runner is built by `server.engine_factory`.
"""

from __future__ import annotations

from typing import Protocol

from server.engine.outputs import EngineCoreOutput, RunnerOutput, SchedulerOutput
from server.engine.scheduler import Scheduler, SchedulerStats
from server.request import Request, RequestStatus


class Executor(Protocol):
    def execute(self, sched: SchedulerOutput) -> RunnerOutput: ...


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, req_ids: list[str]) -> None:
        """Finish requests that hit a stop string (detected on the detokenized text)."""
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> list[EngineCoreOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            # Still let the runner drop finished requests' state.
            self.executor.execute(sched)
            return []
        runner_out = self.executor.execute(sched)
        return self.scheduler.update_from_output(sched, runner_out)
