"""The scheduler: one rule, each request's computed tokens catch up with its tokens.

Every step spends a token budget, running requests first (a decode costs 1 token, a
prompt is chunked to what is left), then admits waiting ones in the order of the waiting
queue (server/engine/request_queue.py: priority with aging, weighted fair between tenants,
FCFS). Chunked prefill, prefix-cache hits and recompute after preemption are all that rule
with different starting points; there are no prefill or decode phases.

Before spending the budget, the step makes room for the request the queue picks next:
  - when no slot or not enough KV is free, it preempts (recompute) running requests of a
    worse priority class, else the latest admitted ones of the tenant most over its
    weighted share of slots, but only while that tenant stays at least as far over its
    share as the newcomer's tenant would be (hysteresis: the swap never reverses);
  - it keeps budget for that request's first chunk: decodes leave up to 1/8 of the
    budget for it (or for a running prefill), and when several tenants want prompt tokens
    the rest is split between them by weight (fair_share.prefill_caps). Prompt chunks of
    the same tenant are not held back, so one tenant and one priority is plain FCFS.
`long_prefill_token_threshold` caps one request's prompt chunk while others run or wait.
When a running request needs KV blocks that are not free, the victim is the worst class,
then the tenant most over its share, then the latest admitted (fair_share.kv_victim).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from server.config import CacheConfig, SchedulerConfig
from server.engine.fair_share import kv_victim, make_room, prefill_caps
from server.engine.kv_cache_manager import KVCacheManager
from server.engine.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    Logprobs,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
from server.engine.request_queue import TenantBook, WaitingQueue
from server.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    # Cumulative since start.
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class Scheduler:
    """Owns the waiting queue, the running list and the KV cache manager."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 num_kv_blocks: int) -> None:
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = scheduler_config.max_model_len
        self.long_prefill_token_threshold = scheduler_config.long_prefill_token_threshold
        self.kv_cache_manager = KVCacheManager(cache_config.block_size, num_kv_blocks,
                                 cache_config.enable_prefix_caching,
                                 scheduler_config.max_model_len)
        self.requests: dict[str, Request] = {}
        self.tenants = TenantBook()
        self.waiting = WaitingQueue(self.tenants, scheduler_config.priority_aging_steps)
        # By priority, then admission order: the last one is the first to be preempted.
        self.running: list[Request] = []
        # Finished since the last schedule(), for the runner to drop.
        self._finished_ids: set[str] = set()
        # Prompt-logprob positions already emitted, so a recompute after preemption
        # does not emit them twice.
        self._prompt_lp_sent: dict[str, int] = {}
        self.num_preemptions = 0
        # Tenants with a request still prefilling after the last step; None: not known.
        self._prefilling_tenants: set[str | None] | None = None

    # ---- queue management -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not 0 < request.num_tokens <= self.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} "
                             f"tokens; must be in [1, max_model_len={self.max_model_len}]")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.tenants.add(request)
        self.waiting.add(request)

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (abort, stop string); frees their blocks at once."""
        if not RequestStatus.is_finished(status):
            raise ValueError(f"{status.name} is not a finished status")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        gone: set[str] = set()
        gone_waiting: list[Request] = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None or request.is_finished:
                continue
            gone.add(req_id)
            was_running = request.status == RequestStatus.RUNNING
            if not was_running:
                gone_waiting.append(request)
            self._finish(request, status, was_running)
        if gone:
            self.running = [r for r in self.running if r.request_id not in gone]
        if gone_waiting:
            self.waiting.remove(gone_waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def get_num_unfinished_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def reset_prefix_cache(self) -> int:
        return self.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        queries, hits = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(len(self.running), len(self.waiting), self.kv_cache_manager.usage,
                              queries, hits, self.num_preemptions)

    # ---- one step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        waiting = self.waiting
        waiting.step += 1
        budget = self.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: set[str] = set()
        kv = self.kv_cache_manager
        running = self.running
        threshold = self.long_prefill_token_threshold

        # Room and budget for the request the queue picks next (see the module docstring).
        head = waiting.peek()
        head_chunk = self._make_room(head, preempted) if head is not None else 0
        if not head_chunk:
            head = None
        # Decodes never take the last eighth of the budget from prompt work: the head's
        # first chunk, or (decided when the budget gets that low) a running prefill.
        prompt_floor = max(1, budget // 8)
        decode_reserve = min(head_chunk, prompt_floor) if head is not None else 0
        floor_undecided = head is None
        # Tenants' shares of prompt tokens, when two or more of them may want some (the set
        # of tenants still prefilling is kept from the last step, None when not known).
        caps = None
        prefilling = self._prefilling_tenants
        if self.tenants.num_active > 1 and (
                prefilling is None or len(prefilling) + (head is not None
                                                         and head.tenant not in prefilling) > 1):
            caps = prefill_caps(running, head, head_chunk, self.tenants, budget, prompt_floor,
                                self.max_model_len, threshold)
        prefilling = set()

        kv_preempted = False
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_new = left = (min(request.num_tokens, self.max_model_len)
                              - request.num_computed_tokens)
            if left > 1:
                if threshold and num_new > threshold and (len(running) > 1 or waiting):
                    num_new = threshold
                limit = budget if caps is None else min(budget, caps.get(request.tenant, budget))
                if num_new >= limit:
                    prefilling.add(request.tenant)  # capped: not done after this step
            else:
                if floor_undecided and budget <= prompt_floor:
                    floor_undecided = False
                    if any(r.num_tokens - r.num_computed_tokens > 1 for r in running[i + 1:]):
                        decode_reserve = prompt_floor
                limit = budget - decode_reserve
            num_new = min(num_new, limit)
            if num_new <= 0:
                i += 1
                continue
            while (new_blocks := kv.allocate_slots(request, num_new)) is None:
                victim = kv_victim(running, i, self.tenants, waiting.admission_order)
                if victim is running[-1]:
                    running.pop()
                else:
                    running.remove(victim)
                self._preempt(victim)
                preempted.add(victim.request_id)
                kv_preempted = True
                if victim is request:
                    break
            if new_blocks is None:
                break
            if left > 1:
                if num_new < left:
                    prefilling.add(request.tenant)
                if caps is not None and request.tenant in caps:
                    caps[request.tenant] -= num_new
            cached_reqs.append(CachedRequestData(
                request.request_id, [b.block_id for b in new_blocks],
                request.num_computed_tokens))
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            i += 1
        # Requests the budget did not reach may be prefilling too: look again next step.
        reached_all = i >= len(running)

        # Admitting while preempting for KV would only thrash: the freed blocks go to
        # running ones. Requests preempted this step wait at least until the next one.
        while (not kv_preempted and waiting and budget > 0
               and len(running) < self.max_num_seqs):
            request = head if head is not None else waiting.peek()
            head = None
            if request is None or request.request_id in preempted:
                break
            hits, num_hit_tokens = kv.get_computed_blocks(request)
            num_new = min(request.num_tokens, self.max_model_len) - num_hit_tokens
            if threshold and num_new > threshold and (running or len(waiting) > 1):
                num_new = threshold
            num_new = min(num_new, budget)
            if caps is not None and request.tenant in caps:
                num_new = min(num_new, caps[request.tenant])
                if num_new <= 0:
                    break
                caps[request.tenant] -= num_new
            if kv.allocate_slots(request, num_new, hits, num_hit_tokens) is None:
                break
            request.effective_priority = min(request.priority,
                                             waiting.effective_priority(request))
            waiting.admit(request)
            self._admit(request)
            request.num_computed_tokens = num_hit_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            new_reqs.append(NewRequestData(
                request.request_id, request.prompt_token_ids, list(request.output_token_ids),
                request.sampling_params, kv.get_block_ids(request.request_id),
                num_hit_tokens))
            num_scheduled[request.request_id] = num_new
            budget -= num_new
            if num_hit_tokens + num_new < request.num_tokens:
                prefilling.add(request.tenant)
        self._prefilling_tenants = prefilling if reached_all else None

        out = SchedulerOutput(
            scheduled_new_reqs=new_reqs,
            scheduled_cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self.max_num_batched_tokens - budget,
            finished_req_ids=self._finished_ids,
            preempted_req_ids=preempted,
        )
        self._finished_ids = set()
        # The next schedule() sees these tokens as computed (the runner computes them now).
        requests = self.requests
        if self.tenants.num_active > 1:
            charge = self.tenants.charge
            for req_id, n in num_scheduled.items():
                request = requests[req_id]
                request.num_computed_tokens += n
                charge(request.tenant, n)
        else:
            for req_id, n in num_scheduled.items():
                requests[req_id].num_computed_tokens += n
        return out

    def _make_room(self, head: Request, preempted: set[str]) -> int:
        """Free a slot and KV blocks for `head`, preempting if the rules allow; returns the
        size of its first chunk, 0 when it cannot get in this step."""
        chunk, victims = make_room(head, self.running, self.tenants, self.kv_cache_manager,
                                   self.max_num_seqs, self.max_num_batched_tokens,
                                   self.max_model_len, self.long_prefill_token_threshold)
        for victim in victims:
            self.running.remove(victim)
            self._preempt(victim)
            preempted.add(victim.request_id)
        return chunk

    def _admit(self, request: Request) -> None:
        request.status = RequestStatus.RUNNING
        self.tenants.states[request.tenant].running += 1
        running = self.running
        if running and running[-1].priority > request.priority:
            running.insert(bisect_right(running, request.priority, key=_priority), request)
        else:
            running.append(request)

    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: RunnerOutput) -> list[EngineCoreOutput]:
        """Append sampled tokens, apply stop rules, free finished requests' blocks."""
        outputs: list[EngineCoreOutput] = []
        finished: set[str] = set()
        requests = self.requests
        sampled_all = runner_output.sampled_token_ids
        logprobs_all = runner_output.logprobs
        prompt_lp_all = runner_output.prompt_logprobs
        running = RequestStatus.RUNNING
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            sampled = sampled_all.get(req_id)
            prompt_lp = prompt_lp_all.get(req_id) if prompt_lp_all else None
            if not sampled and prompt_lp is None:
                continue  # a prompt chunk that produced nothing to report
            request = requests.get(req_id)
            if request is None or request.status != running:
                continue  # finished from outside after schedule()
            if prompt_lp is not None:
                prompt_lp = self._unsent_prompt_logprobs(request, num_scheduled, prompt_lp)
                if not sampled and prompt_lp is None:
                    continue
            new_token_ids: list[int] = []
            stopped = False
            for token_id in sampled or ():
                request.append_output_token(token_id)
                new_token_ids.append(token_id)
                if self._check_stop(request, token_id):
                    stopped = True
                    break
            logprobs = logprobs_all.get(req_id) if logprobs_all else None
            if logprobs is not None and sampled and len(new_token_ids) < len(sampled):
                logprobs = _slice_logprobs(logprobs, 0, len(new_token_ids))
            outputs.append(EngineCoreOutput(
                req_id, new_token_ids,
                request.finish_reason if stopped else None,
                request.stop_reason,
                logprobs,
                prompt_lp,
                max(request.num_cached_tokens, 0),
            ))
            if stopped:
                finished.add(req_id)
                self._finish(request, request.status, True)
        if finished:
            self.running = [r for r in self.running if r.request_id not in finished]
        return outputs

    # ---- helpers ----------------------------------------------------------------------

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Set the finished status if token_id, just appended, ends the request."""
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        # EOS and stop tokens only count after min_tokens tokens (the sampler masks them).
        if num_output > params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = None
                return True
            if token_id in (params.stop_token_ids or ()):
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token_id
                return True
        if ((request.max_tokens is not None and num_output >= request.max_tokens)
                or len(request.all_token_ids) >= self.max_model_len):
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _unsent_prompt_logprobs(self, request: Request, num_scheduled: int,
                                chunk: Logprobs) -> Logprobs | None:
        """Drop positions already emitted before a preemption made the prompt recompute."""
        start = request.num_computed_tokens - num_scheduled  # chunk covers [start, ...)
        sent = self._prompt_lp_sent.get(request.request_id, 0)
        end = start + len(chunk.ranks)
        if end <= sent:
            return None
        self._prompt_lp_sent[request.request_id] = end
        return chunk if start >= sent else _slice_logprobs(chunk, sent - start, len(chunk.ranks))

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.tenants.states[request.tenant].running -= 1
        self.waiting.add_preempted(request)

    def _finish(self, request: Request, status: RequestStatus, in_runner: bool) -> None:
        """Free blocks and forget the request; the caller removes it from the queues.

        Only requests the runner holds state for (running ones) are reported to it.
        """
        if in_runner:
            self._finished_ids.add(request.request_id)
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self._prompt_lp_sent.pop(request.request_id, None)
        self.tenants.finish(request, in_runner)
        self.waiting.forget(request.request_id)


def _priority(request: Request) -> int:
    return request.priority


def _slice_logprobs(logprobs: Logprobs, start: int, stop: int) -> Logprobs:
    return Logprobs(logprobs.token_ids[start:stop], logprobs.logprobs[start:stop],
                    logprobs.ranks[start:stop])
