"""Per-request limits, checked before the work they guard: body size, prompt length, `n`,
`max_tokens`, stop strings and the request timeout.

The prompt-length bound before tokenizing rests on one fact: every token stands for at
most `max_token_bytes` bytes of text (the longest vocabulary entry), so a prompt of B bytes
has at least ceil(B / max_token_bytes) tokens. Vocabulary entries are measured in their
stored spelling, which is never shorter than the bytes they decode to (byte-level BPE
writes a byte as one or two UTF-8 bytes, SentencePiece writes a space as the 3-byte "▁").
A normalizer can shrink text before it is split (NFC composes "e" + U+0301, 3 bytes, into
"é", 2; NFKC folds a 3-byte full-width letter into 1 byte), so with a normalizer the bound
is divided by NORMALIZER_SHRINK to stay a true lower bound.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from server.frontend.errors import APIError

DEFAULT_MAX_N = 128
DEFAULT_MAX_QUEUED_REQUESTS = 1024
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_STOP_STRINGS = 16
DEFAULT_MAX_STOP_STRING_LENGTH = 256
# How much a tokenizer's normalizer may shrink UTF-8 text (see the module docstring).
NORMALIZER_SHRINK = 4


def _positive_or_none(value: float | None) -> Any:
    """Flags use 0 (or no value) for "unbounded"."""
    return None if value is None or value <= 0 else value


@dataclass(frozen=True)
class RequestLimits:
    """What one app accepts; None means unbounded."""

    # Requests (one per prompt) accepted but not yet producing output, and their prompt tokens.
    max_num_queued_requests: int | None = DEFAULT_MAX_QUEUED_REQUESTS
    max_queued_tokens: int | None = None
    max_request_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES
    # None: the context length is the only bound.
    max_prompt_tokens: int | None = None
    max_n: int = DEFAULT_MAX_N
    max_tokens: int | None = None
    max_stop_strings: int | None = DEFAULT_MAX_STOP_STRINGS
    max_stop_string_length: int | None = DEFAULT_MAX_STOP_STRING_LENGTH
    # Seconds from arrival to the last byte; None: no limit.
    request_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_n < 1:
            raise ValueError(f"max_n must be at least 1, got {self.max_n}")
        for name in ("max_num_queued_requests", "max_queued_tokens", "max_request_body_bytes",
                     "max_prompt_tokens", "max_tokens", "max_stop_strings",
                     "max_stop_string_length", "request_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RequestLimits:
        """From `conveyor serve` flags, where 0 means unbounded."""
        return cls(
            max_num_queued_requests=_positive_or_none(args.max_num_queued_requests),
            max_queued_tokens=_positive_or_none(args.max_queued_tokens),
            max_request_body_bytes=_positive_or_none(args.max_request_body_bytes),
            max_prompt_tokens=_positive_or_none(args.max_prompt_tokens),
            max_n=args.max_n,
            max_tokens=_positive_or_none(args.max_tokens_limit),
            max_stop_strings=_positive_or_none(args.max_stop_strings),
            max_stop_string_length=_positive_or_none(args.max_stop_string_length),
            request_timeout=_positive_or_none(args.request_timeout),
        )


def check_sampling_limits(req: Any, limits: RequestLimits) -> None:
    """max_tokens and stop strings (n is checked with the other n rules in check_common)."""
    if limits.max_tokens is not None:
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(req, name, None)
            if value is not None and value > limits.max_tokens:
                raise APIError(f"{name} must be at most {limits.max_tokens}, got {value}.",
                               param=name)
    stop = getattr(req, "stop", None)
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if limits.max_stop_strings is not None and len(stops) > limits.max_stop_strings:
        raise APIError(f"At most {limits.max_stop_strings} stop strings are allowed, got "
                       f"{len(stops)}.", param="stop")
    if limits.max_stop_string_length is not None:
        for s in stops:
            if len(s) > limits.max_stop_string_length:
                raise APIError(f"Stop strings must be at most {limits.max_stop_string_length} "
                               f"characters, got one of {len(s)}.", param="stop")


def prompt_param(req: Any) -> str:
    return "messages" if hasattr(req, "messages") else "prompt"


def prompt_texts(req: Any) -> list[str]:
    """The text each engine request's prompt will contain, before tokenizing: completion
    prompts one by one, or a chat's message texts together (the template adds to them)."""
    messages = getattr(req, "messages", None)
    if messages is not None:
        parts: list[str] = []
        for m in messages:
            if isinstance(m.content, str):
                parts.append(m.content)
            elif m.content is not None:
                parts.extend(p.text for p in m.content if p.text is not None)
        return ["".join(parts)]
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)]
    return []


def num_prompts(req: Any) -> int:
    """Engine requests this HTTP request becomes: one per completion prompt, one per chat."""
    prompt = getattr(req, "prompt", None)
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def max_token_bytes(tokenizer: Any) -> int | None:
    """An upper bound on the UTF-8 bytes one token covers, or None when the tokenizer does
    not list its vocabulary. Computed once per app (a large vocabulary takes ~0.1 s)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return None
    try:
        longest = max((len(t.encode("utf-8")) for t in get_vocab()), default=0)
    except Exception:  # noqa: BLE001 - an exotic tokenizer: no bound, tokenizing still works
        return None
    if longest <= 0:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(backend, "normalizer", None) is not None:
        longest *= NORMALIZER_SHRINK
    return longest


def min_tokens(text: str, token_bytes: int) -> int:
    return math.ceil(len(text.encode("utf-8")) / token_bytes)


def prompt_too_long(param: str, tokens: int, limit: int, at_least: bool) -> APIError:
    has = f"at least {tokens}" if at_least else str(tokens)
    return APIError(f"The prompt has {has} tokens; this server accepts at most {limit}.",
                    param=param, code="prompt_too_long")


def context_exceeded(param: str, tokens: int, max_model_len: int,
                     at_least: bool = False) -> APIError:
    """The prompt alone fills the context (`at_least`: a lower bound, before tokenizing)."""
    has = f"at least {tokens}" if at_least else str(tokens)
    return APIError(
        f"This model's maximum context length is {max_model_len} tokens. However, your "
        f"prompt has {has} tokens, which leaves no room for a completion.",
        param=param, code="context_length_exceeded")


def check_prompt_bound(req: Any, limits: RequestLimits, token_bytes: int | None,
                       max_model_len: int) -> None:
    """Refuses, without tokenizing, a prompt whose length in bytes already proves it too
    long. `max_model_len` 0 (engine not ready yet) skips the context check."""
    if token_bytes is None:
        return
    param = prompt_param(req)
    for text in prompt_texts(req):
        tokens = min_tokens(text, token_bytes)
        if limits.max_prompt_tokens is not None and tokens > limits.max_prompt_tokens:
            raise prompt_too_long(param, tokens, limits.max_prompt_tokens, at_least=True)
        if max_model_len and tokens >= max_model_len:
            raise context_exceeded(param, tokens, max_model_len, at_least=True)


def check_prompt_tokens(param: str, lengths: list[int], limits: RequestLimits) -> None:
    """The exact check, after tokenizing."""
    if limits.max_prompt_tokens is None:
        return
    for n in lengths:
        if n > limits.max_prompt_tokens:
            raise prompt_too_long(param, n, limits.max_prompt_tokens, at_least=False)


def body_too_large(limit: int) -> APIError:
    return APIError(f"The request body is larger than this server accepts ({limit} bytes).",
                    status=413, code="request_too_large")


def request_timeout_error(timeout: float) -> APIError:
    """504: the server gave up on its own deadline (408 would blame the client's upload)."""
    return APIError(f"The request did not finish within the server's request timeout "
                    f"({timeout:g} s); it was cancelled.", status=504, type="server_error",
                    code="request_timeout")
