"""Turns engine-core outputs into RequestOutputs: detokenization, stop strings, n > 1.

Runs beside the tokenizer (front end or offline LLM), never inside the engine loop.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from server.detokenizer import DetokenizerWithStops
from server.engine.outputs import EngineCoreOutput, Logprobs
from server.outputs import (
    CompletionOutput,
    Logprob,
    PositionLogprobs,
    RequestOutput,
    RequestTimes,
)
from server.sampling_params import SamplingParams


@dataclass
class _Sequence:
    index: int
    detok: DetokenizerWithStops
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # How much a streaming consumer has been sent: text chars, tokens, finish.
    sent_text: int = 0
    sent_tokens: int = 0
    sent_finish: bool = False

    def delta(self) -> CompletionOutput | None:
        """What changed since the last delta (None if nothing did); advances the marks."""
        if (len(self.text) == self.sent_text and len(self.token_ids) == self.sent_tokens
                and (self.finish_reason is None or self.sent_finish)):
            return None
        a, b = self.sent_tokens, len(self.token_ids)
        out = CompletionOutput(
            index=self.index, text=self.text[self.sent_text:], token_ids=self.token_ids[a:b],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs[a:b] if self.logprobs is not None else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
        )
        self.sent_text, self.sent_tokens = len(self.text), b
        self.sent_finish = self.finish_reason is not None
        return out


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: dict[str, _Sequence]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    # Streaming consumers get deltas every step instead of one final output.
    stream: bool = False
    sent_prompt_logprobs: bool = False
    # Engine timestamps over the n sequences: the earliest start, the latest finish.
    first_times: RequestTimes | None = None
    finished_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs.values())

    def note_times(self, t: RequestTimes) -> None:
        f = self.first_times
        if f is None:
            self.first_times = t
        else:
            first_token = min((v for v in (f.first_token, t.first_token) if v is not None),
                              default=None)
            self.first_times = RequestTimes(min(f.arrival, t.arrival),
                                            min(f.first_scheduled, t.first_scheduled),
                                            first_token)
        if t.finished is not None:
            self.note_finished(t.finished)

    def note_finished(self, t: float) -> None:
        self.finished_time = t if self.finished_time is None else max(self.finished_time, t)

    def metrics(self) -> RequestTimes | None:
        """None unless the engine reported when the request was scheduled."""
        f = self.first_times
        if f is None or self.finished_time is None:
            return None
        return dataclasses.replace(f, finished=self.finished_time)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    # Sequences that hit a stop string: the engine must finish them.
    stop_string_req_ids: list[str]


def child_request_id(parent_id: str, index: int, n: int) -> str:
    return parent_id if n == 1 else f"{index}_{parent_id}"


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, _ParentState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, stream: bool = False) -> list[str]:
        """Track a request; returns the ids of its n sequences as the engine knows them."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        seqs = {}
        for i in range(params.n):
            cid = child_request_id(request_id, i, params.n)
            seqs[cid] = _Sequence(
                index=i,
                detok=DetokenizerWithStops(self.tokenizer, prompt_token_ids, params),
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            self.child_to_parent[cid] = request_id
        self.parents[request_id] = _ParentState(
            request_id, prompt, list(prompt_token_ids), params, seqs,
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            stream=stream,
        )
        return list(seqs)

    def abort(self, request_ids: list[str]) -> list[str]:
        """Forget the parents; return the child ids the engine must abort."""
        children = []
        for rid in request_ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            for cid in parent.seqs:
                self.child_to_parent.pop(cid, None)
                children.append(cid)
        return children

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def _to_position_logprobs(self, lp: Logprobs) -> list[PositionLogprobs]:
        out = []
        for ids, vals, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            pos: PositionLogprobs = {
                ids[0]: Logprob(vals[0], rank, self.tokenizer.decode([ids[0]]))
            }
            for r, (tid, val) in enumerate(zip(ids[1:], vals[1:]), start=1):
                if tid not in pos:
                    pos[tid] = Logprob(val, r, self.tokenizer.decode([tid]))
            out.append(pos)
        return out

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, _ParentState] = {}
        stopped: list[str] = []
        for o in outputs:
            parent_id = self.child_to_parent.get(o.req_id)
            if parent_id is None:
                continue  # aborted by the user meanwhile
            parent = self.parents[parent_id]
            seq = parent.seqs[o.req_id]
            if seq.finish_reason is not None:
                continue
            touched[parent_id] = parent
            if o.times is not None:
                parent.note_times(o.times)
            parent.num_cached_tokens = max(parent.num_cached_tokens, o.num_cached_tokens)
            if o.prompt_logprobs is not None and parent.prompt_logprobs is not None \
                    and seq.index == 0:
                parent.prompt_logprobs.extend(self._to_position_logprobs(o.prompt_logprobs))
            if not o.new_token_ids:
                if o.finish_reason is not None:  # finished by the engine without a token
                    seq.text += seq.detok.flush()
                    seq.finish_reason, seq.stop_reason = o.finish_reason, o.stop_reason
                continue
            seq.token_ids.extend(o.new_token_ids)
            if o.new_logprobs is not None and seq.logprobs is not None:
                seq.logprobs.extend(self._to_position_logprobs(o.new_logprobs))
                seq.cumulative_logprob += sum(v[0] for v in o.new_logprobs.logprobs)
            delta, stop = seq.detok.update(o.new_token_ids, len(seq.token_ids))
            seq.text += delta
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                stopped.append(o.req_id)
                # The engine does not know yet that this sequence is done.
                parent.note_finished(time.monotonic())
            elif o.finish_reason is not None:
                seq.text += seq.detok.flush()
                seq.finish_reason, seq.stop_reason = o.finish_reason, o.stop_reason
        results = []
        for parent_id, parent in touched.items():
            if parent.stream:
                delta = self._make_delta(parent)
                if delta is not None:
                    results.append(delta)
            elif parent.finished:
                results.append(self._make_output(parent))
            if parent.finished:
                self.parents.pop(parent_id)
                for cid in parent.seqs:
                    self.child_to_parent.pop(cid, None)
        return ProcessedOutputs(results, stopped)

    def _make_delta(self, parent: _ParentState) -> RequestOutput | None:
        outs = [d for s in sorted(parent.seqs.values(), key=lambda s: s.index)
                if (d := s.delta()) is not None]
        if not outs and not parent.finished:
            return None  # e.g. a prompt chunk, or text held back for a stop string
        prompt_lp = None
        if not parent.sent_prompt_logprobs and any(o.token_ids for o in outs):
            prompt_lp, parent.sent_prompt_logprobs = parent.prompt_logprobs, True
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids, prompt_logprobs=prompt_lp,
            outputs=outs, finished=parent.finished, num_cached_tokens=parent.num_cached_tokens,
            metrics=parent.metrics() if parent.finished else None,
        )

    def _make_output(self, parent: _ParentState) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=s.index, text=s.text, token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob, logprobs=s.logprobs,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            )
            for s in sorted(parent.seqs.values(), key=lambda s: s.index)
        ]
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids, prompt_logprobs=parent.prompt_logprobs,
            outputs=outs, finished=True, num_cached_tokens=parent.num_cached_tokens,
            metrics=parent.metrics(),
        )
