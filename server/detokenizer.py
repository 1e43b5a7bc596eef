"""Incremental detokenization and stop strings, one instance per request. No torch.

`IncrementalDetokenizer` turns new token ids into newly stable text: it decodes only a short
window of recent tokens (prefix/read offsets), never the whole output, and holds back text
that ends in an incomplete UTF-8 character (decoded as U+FFFD) until it completes.

`StopStringChecker` sits behind it: it holds back the tail that could still begin a stop
string, and on a match truncates the text before the stop (or after it, when the stop is
to be included). `DetokenizerWithStops` joins the two the way the engine uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from server.sampling_params import SamplingParams

REPLACEMENT = "\ufffd"
# Prompt tokens decoded before the first output token, so that decoders which depend on
# context (SentencePiece's leading space) render the first output token as in the full text.
PROMPT_CONTEXT_TOKENS = 5


def _make_decode(tokenizer: Any, skip_special_tokens: bool,
                 spaces_between_special_tokens: bool) -> Callable[[list[int]], str]:
    # Fast tokenizers: call the Rust decoder directly, skipping per-call Python overhead.
    # Cleanup of tokenization spaces is not applied: it cannot be done incrementally.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer
    if backend is not None:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(
        ids, skip_special_tokens=skip_special_tokens,
        spaces_between_special_tokens=spaces_between_special_tokens,
        clean_up_tokenization_spaces=False)


def _stable_end(text: str) -> int:
    """Length of `text` without its trailing run of U+FFFD (a possibly incomplete char)."""
    return len(text.rstrip(REPLACEMENT))


class IncrementalDetokenizer:
    """Token ids in, newly stable text out.

    The window ids[prefix:] is decoded each call; ids[prefix:read] is context whose text
    (`_base` chars) was emitted before, and `_sent` more chars of the window are emitted.
    Once the window text ends cleanly, the window slides: prefix = read, read = end.
    Joined output equals decoding all output ids in the context of the prompt's tail.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self._decode = _make_decode(tokenizer, skip_special_tokens,
                                    spaces_between_special_tokens)
        context, base_text = self._prompt_context(prompt_token_ids)
        self._ids = context
        self._prefix = 0
        self._read = len(context)
        self._base = len(base_text)
        self._sent = 0

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Append token ids; return the text that became stable."""
        if not new_ids:
            return ""
        self._ids.extend(new_ids)
        text = self._decode(self._ids[self._prefix:])
        end = _stable_end(text)
        start = self._base + self._sent
        if end <= start:
            return ""
        delta = text[start:end]
        if end == len(text):
            self._slide()
        else:
            self._sent += len(delta)
        return delta

    def flush(self) -> str:
        """Everything not yet emitted, incomplete characters included (call at finish)."""
        text = self._decode(self._ids[self._prefix:])
        delta = text[self._base + self._sent:]
        if len(self._ids) > self._read:
            self._slide()
        return delta

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> tuple[list[int], str]:
        """The longest short prompt tail that decodes cleanly, and its text.

        A tail that starts inside a character decodes to U+FFFD (byte-fallback decoders
        even replace the whole byte run), so shorter tails are tried; if the prompt ends
        inside a character, output bytes cannot complete it and there is no context.
        """
        n = len(prompt_token_ids)
        for start in range(max(0, n - PROMPT_CONTEXT_TOKENS), n):
            tail = list(prompt_token_ids[start:])
            text = self._decode(tail)
            if REPLACEMENT not in text:
                return tail, text
        return [], ""

    def _slide(self) -> None:
        self._prefix, self._read = self._read, len(self._ids)
        self._base = len(self._decode(self._ids[self._prefix:self._read]))
        self._sent = 0


class StopStringChecker:
    """Text in, (text safe to emit, matched stop string or None) out.

    The stop that completes first wins (the longest on a tie), so the result does not
    depend on how the text was chunked. A match counts only if it ends in text fed with
    check=True, which is how min_tokens gates stop strings.
    """

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in stop if s]
        self._include = include_stop_str_in_output
        self._lookback = max((len(s) for s in self._stops), default=1) - 1
        # Unemitted text, preceded by up to _lookback chars of emitted text.
        self._buf = ""
        self._emitted = 0  # chars at the start of _buf that were already emitted
        self.stopped: str | None = None

    def feed(self, text: str, check: bool = True) -> tuple[str, str | None]:
        if self.stopped is not None:
            return "", None
        if not self._stops:
            return text, None
        old_len = len(self._buf)
        self._buf += text
        if check and text:
            match = self._find(old_len)
            if match is not None:
                idx, stop = match
                end = idx + len(stop) if self._include else idx
                out = self._buf[self._emitted:end]
                self.stopped = stop
                self._buf, self._emitted = "", 0
                return out, stop
        keep = len(self._buf) - self._held_back()
        out = self._buf[self._emitted:keep] if keep > self._emitted else ""
        self._emitted = max(self._emitted, keep)
        cut = min(self._emitted, max(0, len(self._buf) - self._lookback))
        self._buf = self._buf[cut:]
        self._emitted -= cut
        return out, None

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        out = self._buf[self._emitted:] if self.stopped is None else ""
        self._buf, self._emitted = "", 0
        return out

    def _find(self, old_len: int) -> tuple[int, str] | None:
        """Earliest-ending stop occurrence that ends after old_len, as (start, stop)."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self._stops:
            idx = self._buf.find(s, max(0, old_len - len(s) + 1))
            if idx >= 0:
                key = (idx + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _held_back(self) -> int:
        """Length of the longest tail of _buf that is a proper prefix of some stop."""
        if self._include:
            # Text before a stop is emitted anyway, so partial stops need not wait.
            return 0
        buf = self._buf
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class DetokenizerWithStops:
    """Per request: new token ids -> (text delta, stop string or None).

    Once a stop string matched, the request is done and later calls return nothing.
    On any other finish (eos, length, abort) call flush() for the held-back rest.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(
            tokenizer, prompt_token_ids, params.skip_special_tokens,
            params.spaces_between_special_tokens)
        self._stops = StopStringChecker(params.stop_strings, params.include_stop_str_in_output)
        self._has_stops = bool(params.stop_strings)
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._done = False
        self._chunks: list[str] = []

    @property
    def stop_reason(self) -> str | None:
        return self._stops.stopped

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def update(self, new_ids: Sequence[int], num_output_tokens: int) -> tuple[str, str | None]:
        """`num_output_tokens` counts the request's output tokens including new_ids."""
        if self._done or not new_ids:
            return "", None
        first = num_output_tokens - len(new_ids)
        self._num_tokens = num_output_tokens
        if not self._has_stops:
            return self._emit(self._detok.add_tokens(new_ids)), None
        # Token by token: min_tokens gates stops per token, and a stop ends the output.
        parts: list[str] = []
        for i, tok in enumerate(new_ids):
            text, stop = self._stops.feed(self._detok.add_tokens([tok]),
                                          check=first + i + 1 >= self._min_tokens)
            parts.append(text)
            if stop is not None:
                self._done = True
                return self._emit("".join(parts)), stop
        return self._emit("".join(parts)), None

    def flush(self) -> str:
        """The rest of the text at finish; a stop string completed by it still truncates."""
        if self._done:
            return ""
        self._done = True
        text, stop = self._stops.feed(self._detok.flush(),
                                      check=self._num_tokens >= self._min_tokens)
        if stop is None:
            text += self._stops.flush()
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
        return text
