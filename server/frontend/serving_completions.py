"""POST /v1/completions: prompts -> engine jobs -> a response or a stream of SSE chunks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from server.frontend.engine_streams import EngineJob, merge_streams
from server.frontend.errors import APIError
from server.frontend.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
)
from server.frontend.serving_common import (
    MAX_LOGPROBS,
    ChoiceState,
    Serving,
    build_params,
    check_common,
    check_token_ids,
    clamp_logprob,
    fit_to_context,
    now,
    sse,
    token_text,
)
from server.frontend.tokenization import TokenizerService
from server.outputs import CompletionOutput, PositionLogprobs


@dataclass
class _Prepared:
    request_id: str
    jobs: list[EngineJob]
    n: int
    echo_texts: list[str] | None
    logprobs: int | None


def append_logprobs(tokenizer: TokenizerService, lps: CompletionLogprobs, token_ids: list[int],
                    positions: list[PositionLogprobs | None], offset: int) -> int:
    """Adds tokens to an OpenAI completions logprobs object; returns the next text offset."""
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid) if pos else None
        text = token_text(tokenizer, tid, chosen)
        lps.tokens.append(text)
        lps.text_offset.append(offset)
        offset += len(text)
        lps.token_logprobs.append(clamp_logprob(chosen.logprob) if chosen else None)
        lps.top_logprobs.append(
            {token_text(tokenizer, t, lp): clamp_logprob(lp.logprob) for t, lp in pos.items()}
            if pos else None)
    return offset


class CompletionServing(Serving):
    async def _prompt_token_lists(self, req: CompletionRequest) -> list[tuple[str | None,
                                                                             list[int]]]:
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompts: list = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError("prompt must not be empty.", param="prompt")
        vocab = self.ctx.engine.info.vocab_size
        result: list[tuple[str | None, list[int]]] = []
        for p in prompts:
            if isinstance(p, str):
                if not p:
                    raise APIError("prompt must not be an empty string.", param="prompt")
                ids = await self.ctx.tokenizer.encode(p, add_special_tokens=True)
                result.append((p, ids))
            else:
                ids = list(p)
                if not ids:
                    raise APIError("prompt must not be an empty list of tokens.",
                                   param="prompt")
                check_token_ids(ids, vocab, "prompt")
                result.append((None, ids))
        return result

    async def _prepare(self, req: CompletionRequest) -> _Prepared:
        ctx = self.ctx
        ctx.check_model(req.model)
        n = check_common(req, ctx.limits.max_n)
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {req.logprobs}.",
                           param="logprobs")
        ctx.check_engine()
        info = ctx.engine.info
        echo = bool(req.echo)
        base = build_params(req, info.vocab_size, n=n, max_tokens=req.max_tokens,
                            logprobs=req.logprobs,
                            prompt_logprobs=req.logprobs if echo else None, rename={})
        prompts = await self._prompt_token_lists(req)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        jobs = []
        for i, (text, ids) in enumerate(prompts):
            params = fit_to_context(base, len(ids), info.max_model_len, prompt_param="prompt",
                                    max_tokens_param="max_tokens", rename={})
            job_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            jobs.append(EngineJob(job_id, text, ids, params))
        echo_texts = None
        if echo:
            echo_texts = [text if text is not None else await ctx.tokenizer.decode(ids)
                          for text, ids in prompts]
        return _Prepared(request_id, jobs, n, echo_texts, req.logprobs)

    def _echo_logprobs(self, prep: _Prepared, i: int,
                       prompt_lps: list[PositionLogprobs | None] | None,
                       lps: CompletionLogprobs, offset: int) -> int:
        ids = prep.jobs[i].prompt_token_ids
        positions = prompt_lps if prompt_lps is not None else [None] * len(ids)
        return append_logprobs(self.ctx.tokenizer, lps, ids, positions, offset)

    def _jobs(self, prep: _Prepared) -> list[EngineJob]:
        return prep.jobs

    async def _collect(self, prep: _Prepared) -> CompletionResponse:
        n = prep.n
        states = [ChoiceState() for _ in range(len(prep.jobs) * n)]
        prompt_lps: dict[int, list[PositionLogprobs | None]] = {}
        # aclosing: leaving early (client gone) aborts the engine requests now.
        async with aclosing(merge_streams(self.ctx.engine, prep.jobs, self.ctx.metrics)) as outs:
            async for i, out in outs:
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                for comp in out.outputs:
                    states[i * n + comp.index].add(comp)
        choices = []
        for idx, st in enumerate(states):
            i = idx // n
            text = "".join(st.text)
            lps = None
            if prep.logprobs is not None:
                lps = CompletionLogprobs()
                offset = 0
                if prep.echo_texts is not None:
                    offset = self._echo_logprobs(prep, i, prompt_lps.get(i), lps, offset)
                append_logprobs(self.ctx.tokenizer, lps, st.token_ids, st.positions, offset)
            if prep.echo_texts is not None:
                text = prep.echo_texts[i] + text
            choices.append(CompletionChoice(index=idx, text=text, logprobs=lps,
                                            finish_reason=st.finish_reason,
                                            stop_reason=st.stop_reason))
        prompt_tokens = sum(len(job.prompt_token_ids) for job in prep.jobs)
        completion_tokens = sum(len(st.token_ids) for st in states)
        return CompletionResponse(
            id=prep.request_id, created=now(), model=self.ctx.served_model_name,
            choices=choices,
            usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens))

    def _stream_choice(self, prep: _Prepared, i: int, comp: CompletionOutput,
                       offsets: dict[int, int],
                       prompt_lps: list[PositionLogprobs | None] | None
                       ) -> CompletionChoice | None:
        """The chunk choice for one delta, or None when it carries nothing new."""
        idx = i * prep.n + comp.index
        text = comp.text
        lps = CompletionLogprobs() if prep.logprobs is not None else None
        offset = offsets.get(idx, 0)
        if idx not in offsets and prep.echo_texts is not None:
            # The prompt (and its logprobs) lead the choice's first chunk.
            text = prep.echo_texts[i] + text
            if lps is not None:
                offset = self._echo_logprobs(prep, i, prompt_lps, lps, offset)
        if lps is not None:
            offset = append_logprobs(self.ctx.tokenizer, lps, comp.token_ids,
                                     comp.logprobs or [None] * len(comp.token_ids), offset)
        offsets[idx] = offset
        if not text and comp.finish_reason is None and not (lps and lps.tokens):
            return None  # the detokenizer is holding text back
        return CompletionChoice(index=idx, text=text, logprobs=lps,
                                finish_reason=comp.finish_reason, stop_reason=comp.stop_reason)

    async def _stream(self, prep: _Prepared, include_usage: bool) -> AsyncGenerator[str]:
        created, model = now(), self.ctx.served_model_name
        exclude = None if include_usage else {"usage"}
        offsets: dict[int, int] = {}
        prompt_lps: dict[int, list[PositionLogprobs | None]] = {}
        completion_tokens = 0
        # aclosing: leaving early (client gone) aborts the engine requests now.
        async with aclosing(merge_streams(self.ctx.engine, prep.jobs, self.ctx.metrics)) as outs:
            async for i, out in outs:
                if out.prompt_logprobs is not None:
                    prompt_lps[i] = out.prompt_logprobs
                for comp in out.outputs:
                    completion_tokens += len(comp.token_ids)
                    choice = self._stream_choice(prep, i, comp, offsets, prompt_lps.get(i))
                    if choice is not None:
                        yield sse(CompletionStreamResponse(
                            id=prep.request_id, created=created, model=model,
                            choices=[choice]), exclude)
        if include_usage:
            prompt_tokens = sum(len(job.prompt_token_ids) for job in prep.jobs)
            yield sse(CompletionStreamResponse(
                id=prep.request_id, created=created, model=model, choices=[],
                usage=UsageInfo(prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)))
