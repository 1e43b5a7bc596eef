"""The soak's requests: random valid ones, ones the client cancels mid-stream, invalid ones,
and the check of each outcome against what that request must get back.

Pure data and httpx; bench/soak.py drives them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "paged", "cache",
         "stores", "keys", "and", "values", "in", "blocks", "of", "memory", "continuous",
         "batching", "admits", "requests", "at", "every", "step", "errors", "should",
         "never", "pass", "silently", "readability", "counts", "simple", "beats", "complex")
# Stop strings common enough to end some requests early.
STOPS = ("e", " t", "s ", ".", "\n", "th")
VALID, CANCEL, INVALID = "valid", "cancel", "invalid"


@dataclass
class Case:
    index: int
    kind: str
    path: str
    body: dict[str, Any] | None = None  # None: send `raw` as the body
    raw: bytes = b""
    stream: bool = False
    # Valid: the checks. Invalid: the status it must get. Cancel: chunks to read first.
    expect_status: int = 200
    cancel_after: int = 0


@dataclass
class Outcome:
    index: int
    kind: str
    status: int | None
    ok: bool
    problem: str | None = None
    latency_s: float = 0.0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))


def _sampling(rng: random.Random, max_tokens_cap: int) -> dict[str, Any]:
    max_tokens = rng.randint(1, max_tokens_cap)
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": rng.choice([0.0, 0.0, rng.uniform(0.1, 1.5)]),
        "top_p": rng.choice([1.0, rng.uniform(0.2, 1.0)]),
        "top_k": rng.choice([-1, 0, rng.randint(1, 50)]),
        "min_p": rng.choice([0.0, rng.uniform(0.0, 0.3)]),
        "min_tokens": rng.randint(0, min(3, max_tokens)),
        "ignore_eos": rng.random() < 0.5,
        "n": rng.choice([1, 1, 1, 2]),
        "presence_penalty": rng.choice([0.0, rng.uniform(-1.0, 1.0)]),
        "repetition_penalty": rng.choice([1.0, rng.uniform(0.8, 1.3)]),
    }
    if rng.random() < 0.3:
        body["stop"] = rng.sample(STOPS, rng.randint(1, 2))
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**31 - 1)
    return body


def make_valid(rng: random.Random, index: int, model: str, max_tokens_cap: int) -> Case:
    body = {"model": model, **_sampling(rng, max_tokens_cap)}
    stream = rng.random() < 0.5
    if rng.random() < 0.5:
        path = "/v1/completions"
        body["prompt"] = _prompt(rng)
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 3)
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": _prompt(rng)}]
        if rng.random() < 0.2:
            body.update(logprobs=True, top_logprobs=rng.randint(0, 3))
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return Case(index, VALID, path, body, stream=stream)


def make_cancel(rng: random.Random, index: int, model: str, max_model_len: int) -> Case:
    """A long stream the client drops after a few chunks: the server must free it."""
    body = {"model": model, "prompt": _prompt(rng), "stream": True, "ignore_eos": True,
            "max_tokens": max(8, min(400, max_model_len // 2)),
            "temperature": rng.choice([0.0, 0.8])}
    return Case(index, CANCEL, "/v1/completions", body, stream=True,
                cancel_after=rng.randint(1, 4))


def make_invalid(rng: random.Random, index: int, model: str, max_model_len: int) -> Case:
    good = {"model": model, "prompt": _prompt(rng), "max_tokens": 4}
    chat = {"model": model, "messages": [{"role": "user", "content": _prompt(rng)}]}
    completions, chat_path = "/v1/completions", "/v1/chat/completions"
    choices: list[tuple[str, dict[str, Any] | None, bytes, int]] = [
        (completions, {**good, "temperature": -1.0}, b"", 400),
        (completions, {**good, "top_p": 1.5}, b"", 400),
        (completions, {**good, "n": 0}, b"", 400),
        (completions, {**good, "max_tokens": -3}, b"", 400),
        (completions, {**good, "min_tokens": 9}, b"", 400),
        (completions, {**good, "prompt": 5}, b"", 400),
        (completions, {**good, "max_tokens": max_model_len + 1}, b"", 400),  # past context
        (completions, {**good, "prompt": [7] * (max_model_len + 1)}, b"", 400),  # too long
        (completions, {**good, "model": "no-such-model"}, b"", 404),
        (completions, None, b'{"prompt": "unterminated', 400),
        (completions, None, b"\xff\xfe not utf-8", 400),
        (chat_path, {**chat, "messages": "not a list"}, b"", 400),
        (chat_path, {**chat, "temperature": -2.0}, b"", 400),
        (chat_path, {**chat, "model": "no-such-model"}, b"", 404),
    ]
    path, body, raw, status = rng.choice(choices)
    return Case(index, INVALID, path, body, raw=raw, expect_status=status)


def make_cases(n: int, rng: random.Random, model: str, max_model_len: int,
               max_tokens_cap: int, cancel_frac: float, invalid_frac: float) -> list[Case]:
    cap = max(1, min(max_tokens_cap, max_model_len // 4))
    cases = []
    for i in range(n):
        r = rng.random()
        if r < cancel_frac:
            cases.append(make_cancel(rng, i, model, max_model_len))
        elif r < cancel_frac + invalid_frac:
            cases.append(make_invalid(rng, i, model, max_model_len))
        else:
            cases.append(make_valid(rng, i, model, cap))
    return cases


# ---- checking --------------------------------------------------------------------------

def _openai_error_problem(body: Any) -> str | None:
    if not isinstance(body, dict) or set(body) != {"error"}:
        return f"not an OpenAI error body: {str(body)[:200]}"
    err = body["error"]
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"error fields are {sorted(err) if isinstance(err, dict) else err!r}"
    if not isinstance(err["message"], str) or not isinstance(err["type"], str):
        return "error message/type are not strings"
    return None


def _choices_problem(case: Case, finals: dict[int, tuple[str | None, Any]],
                     completion_tokens: int | None) -> str | None:
    """Every sequence finished for a reason its parameters allow."""
    body = case.body or {}
    n, max_tokens = body.get("n", 1), body["max_tokens"]
    stops = body.get("stop") or []
    if sorted(finals) != list(range(n)):
        return f"choices {sorted(finals)} for n={n}"
    for idx, (reason, stop_reason) in finals.items():
        if reason not in ("stop", "length"):
            return f"choice {idx} finish_reason {reason!r}"
        if reason == "stop":
            if isinstance(stop_reason, str) and stop_reason not in stops:
                return f"choice {idx} stopped on {stop_reason!r}, not one of {stops}"
            if stop_reason is None and body.get("ignore_eos"):
                return f"choice {idx} stopped on EOS with ignore_eos"
        if reason == "stop" and not stops and body.get("ignore_eos"):
            return f"choice {idx} stopped with ignore_eos and no stop strings"
    if completion_tokens is None:
        return "no usage"
    if completion_tokens > n * max_tokens:
        return f"{completion_tokens} completion tokens > n * max_tokens = {n * max_tokens}"
    if completion_tokens < n * body.get("min_tokens", 0):
        return f"{completion_tokens} completion tokens < n * min_tokens"
    if all(r == "length" for r, _ in finals.values()) and completion_tokens != n * max_tokens:
        return f"all 'length' but {completion_tokens} tokens != {n * max_tokens}"
    return None


async def _read_stream(resp: httpx.Response, case: Case, out: Outcome) -> None:
    finals: dict[int, tuple[str | None, Any]] = {}
    usage = None
    lines = [line async for line in _data_lines(resp, case, out)]
    if case.kind == CANCEL:
        return
    if not lines or lines[-1] != "[DONE]":
        out.problem = "stream did not end with [DONE]"
        return
    for data in lines[:-1]:
        obj = json.loads(data)
        if "error" in obj:
            out.problem = f"error event: {data[:200]}"
            return
        for choice in obj.get("choices") or ():
            if choice.get("finish_reason") is not None:
                finals[choice["index"]] = (choice["finish_reason"], choice.get("stop_reason"))
        usage = obj.get("usage") or usage
    out.completion_tokens = (usage or {}).get("completion_tokens", 0)
    out.finish_reasons = [finals[i][0] or "" for i in sorted(finals)]
    out.problem = _choices_problem(case, finals, usage and usage.get("completion_tokens"))


async def _data_lines(resp: httpx.Response, case: Case, out: Outcome):
    seen = 0
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        yield data
        seen += 1
        if case.kind == CANCEL and seen >= case.cancel_after:
            if '"error"' in data:
                out.problem = f"error before the cancel: {data[:200]}"
            return  # leaving the `async with` closes the connection: a client disconnect


async def run_case(client: httpx.AsyncClient, case: Case) -> Outcome:
    out = Outcome(case.index, case.kind, None, False)
    t0 = time.perf_counter()
    content = json.dumps(case.body).encode() if case.body is not None else case.raw
    headers = {"content-type": "application/json"}
    try:
        if case.stream:
            async with client.stream("POST", case.path, content=content,
                                     headers=headers) as resp:
                out.status = resp.status_code
                if resp.status_code != 200:
                    await resp.aread()
                    out.problem = f"status {resp.status_code}: {resp.text[:200]}"
                else:
                    await _read_stream(resp, case, out)
        else:
            resp = await client.post(case.path, content=content, headers=headers)
            out.status = resp.status_code
            _check_plain(case, resp, out)
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, TypeError) as exc:
        out.problem = f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - t0
    out.ok = out.problem is None
    return out


def _check_plain(case: Case, resp: httpx.Response, out: Outcome) -> None:
    if case.kind == INVALID:
        if resp.status_code != case.expect_status:
            out.problem = f"status {resp.status_code}, expected {case.expect_status}"
        else:
            out.problem = _openai_error_problem(resp.json())
        return
    if resp.status_code != 200:
        out.problem = f"status {resp.status_code}: {resp.text[:200]}"
        return
    body = resp.json()
    finals = {c["index"]: (c.get("finish_reason"), c.get("stop_reason"))
              for c in body["choices"]}
    usage = body.get("usage") or {}
    out.completion_tokens = usage.get("completion_tokens", 0)
    out.finish_reasons = [finals[i][0] or "" for i in sorted(finals)]
    out.problem = _choices_problem(case, finals, usage.get("completion_tokens"))
