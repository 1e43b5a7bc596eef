"""POST /v1/chat/completions: messages -> chat template -> one engine job -> response/stream."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from server.frontend.engine_streams import EngineJob, merge_streams
from server.frontend.errors import APIError
from server.frontend.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprobEntry,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
)
from server.frontend.serving_common import (
    LOGPROB_FLOOR,
    MAX_LOGPROBS,
    ChoiceState,
    Serving,
    build_params,
    check_common,
    clamp_logprob,
    fit_to_context,
    now,
    sse,
    token_text,
)
from server.frontend.tokenization import TokenizerService
from server.outputs import PositionLogprobs

ROLES = ("system", "user", "assistant")


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts for the chat template; text parts joined by newlines."""
    if not messages:
        raise APIError("messages must contain at least one message.", param="messages")
    result = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise APIError(f"messages[{i}].role {m.role!r} is not supported; use one of "
                           f"{', '.join(ROLES)}.", param="messages")
        if m.content is None or isinstance(m.content, str):
            content = m.content or ""
        else:
            texts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(f"messages[{i}] has a content part of type {part.type!r}; "
                                   "only text parts are supported.", param="messages")
                texts.append(part.text)
            content = "\n".join(texts)
        result.append({"role": m.role, "content": content})
    return result


def chat_logprobs(tokenizer: TokenizerService, token_ids: list[int],
                  positions: list[PositionLogprobs | None], top_n: int) -> ChatLogprobs:
    entries = []
    for tid, pos in zip(token_ids, positions):
        chosen = pos.get(tid) if pos else None
        text = token_text(tokenizer, tid, chosen)
        ranked = sorted((pos or {}).items(), key=lambda kv: (
            kv[1].rank if kv[1].rank is not None else math.inf, -kv[1].logprob))
        tops = []
        for t, lp in ranked[:top_n]:
            s = token_text(tokenizer, t, lp)
            tops.append(TopLogprob(token=s, logprob=clamp_logprob(lp.logprob),
                                   bytes=list(s.encode("utf-8"))))
        entries.append(ChatLogprobEntry(
            token=text, logprob=clamp_logprob(chosen.logprob) if chosen else LOGPROB_FLOOR,
            bytes=list(text.encode("utf-8")), top_logprobs=tops))
    return ChatLogprobs(content=entries)


@dataclass
class _Prepared:
    request_id: str
    job: EngineJob
    n: int
    top_logprobs: int | None  # None: no logprobs asked for


class ChatServing(Serving):
    async def _prepare(self, req: ChatCompletionRequest) -> _Prepared:
        ctx = self.ctx
        ctx.check_model(req.model)
        n = check_common(req, ctx.limits.max_n)
        if req.top_logprobs is not None:
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got "
                               f"{req.top_logprobs}.", param="top_logprobs")
            if not req.logprobs:
                raise APIError("top_logprobs requires logprobs to be true.",
                               param="top_logprobs")
        top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if req.max_completion_tokens is not None:
            max_tokens, max_name = req.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, max_name = req.max_tokens, "max_tokens"
        rename = {"max_tokens": max_name, "logprobs": "top_logprobs"}
        messages = messages_to_dicts(req.messages)
        ctx.check_engine()
        info = ctx.engine.info
        params = build_params(req, info.vocab_size, n=n, max_tokens=max_tokens,
                              logprobs=top_logprobs, prompt_logprobs=None, rename=rename)
        add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
        prompt = await ctx.tokenizer.render_chat(messages, add_gen)
        # The template already wrote BOS and friends; encoding must not add them again.
        ids = await ctx.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise APIError("The rendered chat prompt is empty.", param="messages")
        params = fit_to_context(params, len(ids), info.max_model_len, prompt_param="messages",
                                max_tokens_param=max_name, rename=rename)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        return _Prepared(request_id, EngineJob(request_id, prompt, ids, params), n,
                         top_logprobs)

    def _jobs(self, prep: _Prepared) -> list[EngineJob]:
        return [prep.job]

    async def _collect(self, prep: _Prepared) -> ChatCompletionResponse:
        states = [ChoiceState() for _ in range(prep.n)]
        # aclosing: leaving early (client gone) aborts the engine requests now.
        async with aclosing(merge_streams(self.ctx.engine, [prep.job], self.ctx.metrics)) as outs:
            async for _, out in outs:
                for comp in out.outputs:
                    states[comp.index].add(comp)
        choices = []
        for idx, st in enumerate(states):
            lps = None
            if prep.top_logprobs is not None:
                lps = chat_logprobs(self.ctx.tokenizer, st.token_ids, st.positions,
                                    prep.top_logprobs)
            choices.append(ChatChoice(index=idx, message=AssistantMessage(content="".join(st.text)),
                                      logprobs=lps, finish_reason=st.finish_reason,
                                      stop_reason=st.stop_reason))
        prompt_tokens = len(prep.job.prompt_token_ids)
        completion_tokens = sum(len(st.token_ids) for st in states)
        return ChatCompletionResponse(
            id=prep.request_id, created=now(), model=self.ctx.served_model_name,
            choices=choices,
            usage=UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=prompt_tokens + completion_tokens))

    async def _stream(self, prep: _Prepared, include_usage: bool) -> AsyncGenerator[str]:
        created, model = now(), self.ctx.served_model_name
        exclude = None if include_usage else {"usage"}

        def chunk(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionStreamResponse(id=prep.request_id, created=created,
                                                    model=model, choices=[choice]), exclude)

        # Every choice opens with the role, as OpenAI's streams do.
        for idx in range(prep.n):
            yield chunk(ChatStreamChoice(index=idx,
                                         delta=DeltaMessage(role="assistant", content="")))
        completion_tokens = 0
        # aclosing: leaving early (client gone) aborts the engine requests now.
        async with aclosing(merge_streams(self.ctx.engine, [prep.job], self.ctx.metrics)) as outs:
            async for _, out in outs:
                for comp in out.outputs:
                    completion_tokens += len(comp.token_ids)
                    lps = None
                    if prep.top_logprobs is not None and comp.token_ids:
                        lps = chat_logprobs(self.ctx.tokenizer, comp.token_ids,
                                            comp.logprobs or [None] * len(comp.token_ids),
                                            prep.top_logprobs)
                    if not comp.text and comp.finish_reason is None and lps is None:
                        continue  # nothing new yet (the detokenizer is holding text back)
                    delta = DeltaMessage(content=comp.text) if comp.text else DeltaMessage()
                    yield chunk(ChatStreamChoice(index=comp.index, delta=delta, logprobs=lps,
                                                 finish_reason=comp.finish_reason,
                                                 stop_reason=comp.stop_reason))
        if include_usage:
            prompt_tokens = len(prep.job.prompt_token_ids)
            yield sse(ChatCompletionStreamResponse(
                id=prep.request_id, created=created, model=model, choices=[],
                usage=UsageInfo(prompt_tokens=prompt_tokens,
                                completion_tokens=completion_tokens,
                                total_tokens=prompt_tokens + completion_tokens)))
