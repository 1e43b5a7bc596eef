"""One HTTP request's engine jobs: their streams merged, each observed as it runs.

A completion with several prompts is several engine jobs; `merge_streams` interleaves
their outputs. Every job's outputs pass through its observers on the way out: the request
metrics (RequestTracker) and admission's watch (a job leaves the front-end queue at its
first output). Closing the merged stream aborts whatever is still running in the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from server.frontend.engine_client import EngineClient
from server.frontend.errors import APIError
from server.frontend.metrics import Metrics, RequestTracker
from server.outputs import RequestOutput
from server.sampling_params import SamplingParams


@dataclass
class EngineJob:
    """One engine request: a single prompt, fanned out by the engine to params.n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    # time.monotonic() when the HTTP request arrived (Serving.create sets it), for TTFT.
    arrival: float = field(default_factory=time.monotonic)
    # Admission's watch over the job's outputs (its first output leaves the queue).
    watch: Any = None
    # Scheduling: lower priority first; tenant (None = default) and its weight.
    priority: int = 0
    tenant: str | None = None
    tenant_weight: float = 1.0

    def scheduling_kwargs(self) -> dict[str, Any]:
        """generate()'s scheduling keywords."""
        return {"priority": self.priority, "tenant": self.tenant,
                "tenant_weight": self.tenant_weight}



class _NoTracker:
    def on_output(self, out: RequestOutput) -> None:
        pass

    def close(self, aborted: bool) -> None:
        pass


class _Watched:
    """A tracker and the job's admission watch, seeing the same outputs and close."""

    def __init__(self, tracker: RequestTracker | _NoTracker, watch: Any) -> None:
        self.tracker = tracker
        self.watch = watch

    def on_output(self, out: RequestOutput) -> None:
        self.watch.on_output(out)
        self.tracker.on_output(out)

    def close(self, aborted: bool) -> None:
        self.watch.close(aborted)
        self.tracker.close(aborted)


def _tracker(metrics: Metrics | None, job: EngineJob) -> RequestTracker | _NoTracker | _Watched:
    tracker: RequestTracker | _NoTracker = _NoTracker()
    if metrics is not None:
        tracker = metrics.track(len(job.prompt_token_ids), job.params.n, job.arrival)
    return tracker if job.watch is None else _Watched(tracker, job.watch)


async def merge_streams(engine: EngineClient, jobs: list[EngineJob],
                        metrics: Metrics | None = None
                        ) -> AsyncGenerator[tuple[int, RequestOutput]]:
    """Interleaves the engine streams of several jobs as (job index, output).

    With `metrics`, each job's outputs are observed as they come out of the engine, and
    the job is recorded when its stream ends (finished, failed, or aborted).

    Each job is pumped by its own task into one queue. Closing this generator (client gone,
    error, cancellation) cancels the pumps, which stops iterating the engine generators:
    that is what aborts the requests in the engine. The cleanup never awaits, because it
    may run inside a cancelled scope.
    """
    if len(jobs) == 1:
        # The common case, without a pump task and queue hop per token.
        job = jobs[0]
        tracker = _tracker(metrics, job)
        aborted = False
        stream = engine.generate(job.request_id, job.prompt, job.prompt_token_ids, job.params,
                                 **job.scheduling_kwargs())
        try:
            async for out in stream:
                tracker.on_output(out)
                yield 0, out
        except ValueError as exc:  # the engine refused the request
            raise APIError(str(exc)) from exc
        except (GeneratorExit, asyncio.CancelledError):
            aborted = True
            raise
        finally:
            tracker.close(aborted)
            await stream.aclose()  # never suspends: the engine's cleanup does not await
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, job: EngineJob) -> None:
        # The generator is created inside the task: a task cancelled before it starts has
        # then submitted nothing to the engine.
        tracker = _tracker(metrics, job)
        aborted = False
        try:
            async for out in engine.generate(job.request_id, job.prompt,
                                             job.prompt_token_ids, job.params,
                                             **job.scheduling_kwargs()):
                tracker.on_output(out)
                queue.put_nowait((i, out))
        except ValueError as exc:  # the engine refused the request (EngineClient.generate)
            queue.put_nowait((i, APIError(str(exc))))
            return
        except asyncio.CancelledError:
            aborted = True
            raise
        except Exception as exc:
            queue.put_nowait((i, exc))
            return
        finally:
            tracker.close(aborted)
        queue.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
