"""A scripted EngineClient and a character-level tokenizer for HTTP tests (no model, no torch).

The tokenizer maps each character to one id (3 + code point), so expected token counts
and texts can be written down by hand. The engine answers every sequence with a scripted
reply, one token per delta, round-robin over the n sequences, and records what it was
asked and what was aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.frontend.engine_client import EngineClient, EngineDeadError, ModelInfo
from server.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from server.sampling_params import SamplingParams

BOS, EOS, UNK = 0, 1, 2
SPECIALS = {"<s>": BOS, "</s>": EOS, "<unk>": UNK}
OFFSET = 3
VOCAB_SIZE = 300
CHAT_TEMPLATE = "fake: [role]content per message, then [assistant]"


class CharTokenizer:
    """Enough of the Hugging Face tokenizer API for the front end."""

    def __init__(self, chat_template: str | None = CHAT_TEMPLATE) -> None:
        self.chat_template = chat_template
        self.calls: list[tuple[str, bool]] = []

    def __len__(self) -> int:
        return VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((text, add_special_tokens))
        ids = [BOS] if add_special_tokens else []
        i = 0
        while i < len(text):
            for name, tid in SPECIALS.items():
                if text.startswith(name, i):
                    ids.append(tid)
                    i += len(name)
                    break
            else:
                code = ord(text[i]) + OFFSET
                ids.append(code if code < VOCAB_SIZE else UNK)
                i += 1
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = {tid: name for name, tid in SPECIALS.items()}
        out = []
        for t in ids:
            if t in names:
                if not skip_special_tokens:
                    out.append(names[t])
            elif OFFSET <= t < VOCAB_SIZE:
                out.append(chr(t - OFFSET))
            else:
                raise ValueError(f"token id {t} is out of range")
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                            tokenize: bool) -> str:
        assert not tokenize
        if self.chat_template is None:
            raise ValueError("no chat template")
        text = "<s>" + "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")


def tok_ids(text: str) -> list[int]:
    return CharTokenizer().encode(text, add_special_tokens=False)


def default_reply(prompt_token_ids: list[int], index: int) -> str:
    # Different lengths per sequence, so their finishes interleave.
    return "Hello" + "!" * index


@dataclass
class Submitted:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    tenant: str | None = None
    tenant_weight: float = 1.0


@dataclass
class FakeEngineClient(EngineClient):
    max_model_len: int = 64
    reply: Callable[[list[int], int], str] = default_reply
    # Seconds to wait before each delta (lets tests disconnect mid-request).
    delay: float = 0.0
    # Raise RuntimeError after this many deltas (a failure in the middle of a stream).
    fail_after: int | None = None
    # Raise ValueError(refuse) from generate, as an engine refusing a request does.
    refuse: str | None = None
    ready: bool = True
    dead: bool = False
    tokenizer: CharTokenizer = field(default_factory=CharTokenizer)
    requests: list[Submitted] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    @property
    def info(self) -> ModelInfo:  # type: ignore[override]
        return ModelInfo(max_model_len=self.max_model_len, vocab_size=VOCAB_SIZE,
                         eos_token_ids=frozenset({EOS}))

    def is_ready(self) -> bool:
        return self.ready and not self.dead

    def is_dead(self) -> bool:
        return self.dead

    @staticmethod
    def logprobs_for(token_id: int, k: int, base: float) -> PositionLogprobs:
        """The chosen token at rank 1, then k alternatives (the next ids) below it."""
        tok = CharTokenizer()
        pos: PositionLogprobs = {token_id: Logprob(base, 1, tok.decode([token_id]))}
        for r in range(1, k + 1):
            alt = OFFSET + (token_id - OFFSET + r) % (VOCAB_SIZE - OFFSET)
            pos.setdefault(alt, Logprob(base - r, r + 1, tok.decode([alt])))
        return pos

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams, *, priority: int = 0, tenant: str | None = None,
                       tenant_weight: float = 1.0) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("dead")
        if self.refuse is not None:
            raise ValueError(self.refuse)
        self.requests.append(Submitted(request_id, prompt, prompt_token_ids, params,
                                       priority, tenant, tenant_weight))
        full = [tok_ids(self.reply(prompt_token_ids, j)) for j in range(params.n)]
        replies = [r[: params.max_tokens] for r in full]
        limits = [len(r) for r in replies]
        prompt_lps = None
        if params.prompt_logprobs is not None:
            prompt_lps = [None] + [self.logprobs_for(t, params.prompt_logprobs, -2.0)
                                   for t in prompt_token_ids[1:]]
        step, sent = 0, 0
        done = False
        try:
            while step < max(limits):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                if self.fail_after is not None and sent >= self.fail_after:
                    raise RuntimeError("scripted engine failure")
                outs = []
                for j, ids in enumerate(replies):
                    if step >= len(ids):
                        continue
                    last = step == len(ids) - 1
                    reason = None
                    if last:
                        reason = "length" if len(full[j]) >= params.max_tokens else "stop"
                    lps = None
                    if params.logprobs is not None:
                        lps = [self.logprobs_for(ids[step], params.logprobs, -0.5)]
                    outs.append(CompletionOutput(
                        index=j, text=CharTokenizer().decode([ids[step]]),
                        token_ids=[ids[step]], cumulative_logprob=None, logprobs=lps,
                        finish_reason=reason))
                step += 1
                sent += 1
                finished = step >= max(limits)
                yield RequestOutput(request_id, prompt, prompt_token_ids,
                                    prompt_lps if sent == 1 else None, outs, finished)
            done = True
            self.finished.append(request_id)
        finally:
            # Stopping iteration early is how a client disconnect reaches the engine.
            if not done:
                self.aborted.append(request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def get_stats(self) -> dict[str, float]:
        return {"num_running": 0.0, "num_waiting": 0.0}

    async def shutdown(self) -> None:
        self.dead = True
