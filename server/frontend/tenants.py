"""Per-API-key tenants (--api-keys-file): authentication, token-bucket rate limits, headers.

The file maps each API key to a tenant, its requests and tokens per minute, and a weight:

    keys:
      sk-team-a: {tenant: team-a, requests_per_minute: 60, tokens_per_minute: 100000, weight: 2}

A limit left out (or null) is unlimited; weight defaults to 1. Each key has its own two
buckets, holding up to a minute's allowance and refilling continuously. A generation
request takes one request at once; after tokenizing it reserves its prompt tokens plus
n * max_tokens, and gives back what it did not use when it ends. A bucket admits a cost
when it holds at least min(cost, capacity), then may go below zero: a request larger than a
minute's allowance waits for a full bucket instead of being refused forever.

Responses on the OpenAI routes of a limited key carry OpenAI's x-ratelimit-limit-*,
x-ratelimit-remaining-* and x-ratelimit-reset-* headers (for requests and for tokens, the
reset as a duration like "1s", "6m0s" or "120ms": the time until the bucket is full). The
request's tenant is left on `request.state.tenant` (a TenantInfo) for the scheduler.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.frontend.admission import REJECT_TENANT_REQUESTS, REJECT_TENANT_TOKENS, rate_limited
from server.frontend.auth import bearer_token, is_open_path, unauthorized
from server.frontend.lifecycle import GENERATION_PATHS

OPENAI_PREFIXES = ("/v1/", "/openai/v1/")
_FIELDS = ("tenant", "requests_per_minute", "tokens_per_minute", "weight")


class APIKeysError(ValueError):
    """A bad --api-keys-file; the message names the file and the entry."""


@dataclass(frozen=True)
class TenantInfo:
    """Who a request is for, as the scheduler sees it."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class KeySpec:
    tenant: str
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    weight: float = 1.0


def format_duration(seconds: float) -> str:
    """OpenAI's reset format (Go's duration): "0s", "120ms", "1.5s", "6m0s", "1h2m3s".
    Rounded up to the millisecond, so a reset is never announced early."""
    ms = math.ceil(round(max(seconds, 0.0) * 1000, 6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    return (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{sec}s"


class TokenBucket:
    """`per_minute` units of capacity, refilled continuously at per_minute / 60 a second."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.level = self.capacity
        self.stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Takes `amount` and returns 0, or takes nothing and returns the seconds to wait."""
        self._refill()
        need = min(amount, self.capacity)
        if self.level >= need:
            self.level -= amount
            return 0.0
        return (need - self.level) / self.rate

    def give_back(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)

    def remaining(self) -> int:
        self._refill()
        return max(0, math.floor(self.level))

    def seconds_until_full(self) -> float:
        self._refill()
        return (self.capacity - self.level) / self.rate


class TenantLimits:
    """One key's tenant and buckets."""

    def __init__(self, spec: KeySpec, clock: Callable[[], float]) -> None:
        self.spec = spec
        self.info = TenantInfo(spec.tenant, spec.weight)
        rpm, tpm = spec.requests_per_minute, spec.tokens_per_minute
        self.requests = TokenBucket(rpm, clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock) if tpm else None

    def take_request(self) -> float:
        """0 when the request may go, else the seconds until it could."""
        return self.requests.take(1) if self.requests is not None else 0.0

    def reserve_tokens(self, cost: int, reject: Callable[[str], None]) -> None:
        """Reserves `cost` tokens or raises a 429 (counted through `reject`)."""
        if self.tokens is None:
            return
        wait = self.tokens.take(cost)
        if wait:
            reject(REJECT_TENANT_TOKENS)
            raise rate_limited(
                f"Rate limit reached for tokens per minute on this API key: limit "
                f"{self.spec.tokens_per_minute}, remaining {self.tokens.remaining()}, "
                f"requested {cost} (prompt plus n * max_tokens). Retry in "
                f"{format_duration(wait)}, or lower max_tokens.", wait)

    def refund_tokens(self, amount: int) -> None:
        if self.tokens is not None:
            self.tokens.give_back(amount)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = []
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            out += [(f"x-ratelimit-limit-{kind}".encode(), str(int(bucket.capacity)).encode()),
                    (f"x-ratelimit-remaining-{kind}".encode(), str(bucket.remaining()).encode()),
                    (f"x-ratelimit-reset-{kind}".encode(),
                     format_duration(bucket.seconds_until_full()).encode())]
        return out


def _digest(key: bytes) -> bytes:
    # Keys are looked up by hash, so lookup time says nothing about a key's prefix.
    return hashlib.sha256(key).digest()


class Tenants:
    """Every key of the file, by digest, with its live buckets."""

    def __init__(self, keys: dict[str, KeySpec],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._by_digest = {_digest(k.encode()): TenantLimits(spec, clock)
                           for k, spec in keys.items()}

    def lookup(self, key: bytes) -> TenantLimits | None:
        return self._by_digest.get(_digest(key))

    @classmethod
    def from_file(cls, path: str | Path) -> Tenants:
        return cls(load_api_keys(path))


def _entry(i: int, key: object) -> str:
    shown = repr(key[:6] + "...") if isinstance(key, str) and len(key) > 6 else repr(key)
    return f"entry {i + 1} (key {shown})"


def _limit(where: str, spec: dict, name: str) -> int | None:
    value = spec.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise APIKeysError(f"{where}: {name} must be a positive integer or null, got {value!r}")
    return value


def _spec(where: str, spec: Any) -> KeySpec:
    if not isinstance(spec, dict):
        raise APIKeysError(f"{where}: expected a mapping of {', '.join(_FIELDS)}, got {spec!r}")
    unknown = sorted(str(k) for k in spec if k not in _FIELDS)
    if unknown:
        raise APIKeysError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: "
                           f"{', '.join(_FIELDS)})")
    tenant = spec.get("tenant")
    if not isinstance(tenant, str) or not tenant.strip():
        raise APIKeysError(f"{where}: tenant must be a non-empty string, got {tenant!r}")
    weight = spec.get("weight", 1.0)
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
            or not math.isfinite(weight) or weight <= 0):
        raise APIKeysError(f"{where}: weight must be a positive number, got {weight!r}")
    return KeySpec(tenant, _limit(where, spec, "requests_per_minute"),
                   _limit(where, spec, "tokens_per_minute"), float(weight))


def load_api_keys(path: str | Path) -> dict[str, KeySpec]:
    """Parses and checks the whole file; any defect raises APIKeysError naming the entry."""
    import yaml  # lazy: only a server given the file needs it

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise APIKeysError(f"{path}: cannot read the API keys file: {exc}") from None
    except yaml.YAMLError as exc:
        raise APIKeysError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) != {"keys"}:
        raise APIKeysError(f"{path}: expected one top-level mapping, 'keys'")
    keys = data["keys"]
    if not isinstance(keys, dict) or not keys:
        raise APIKeysError(f"{path}: 'keys' must map at least one API key to its settings")
    out = {}
    for i, (key, spec) in enumerate(keys.items()):
        where = f"{path}: {_entry(i, key)}"
        if not isinstance(key, str) or not key or key != key.strip() or " " in key:
            raise APIKeysError(f"{where}: an API key must be a non-empty string without "
                               "spaces")
        out[key] = _spec(where, spec)
    return out


class TenantMiddleware:
    """Authenticates by the keys file (and --api-key, as an unlimited admin key), takes one
    request from the key's bucket for each generation request (429 when empty), records
    the tenant on the request state, and adds the rate-limit headers. Plain ASGI."""

    def __init__(self, app: ASGIApp, tenants: Tenants, admin_key: str | None = None,
                 on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.tenants = tenants
        self._admin = admin_key.encode() if admin_key else None
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or is_open_path(path):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        limits = self.tenants.lookup(token) if token else None
        if limits is None:
            if token is None or not (self._admin and hmac.compare_digest(token, self._admin)):
                error = unauthorized(missing=token is None)
                await error.response()(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the admin key: no tenant, no limits
            return
        state = scope.setdefault("state", {})
        state["tenant"] = limits.info
        state["rate_limits"] = limits
        if path.startswith(OPENAI_PREFIXES):
            send = _with_headers(send, limits)
        if scope.get("method") == "POST" and path in GENERATION_PATHS:
            wait = limits.take_request()
            if wait:
                if self._on_reject is not None:
                    self._on_reject(REJECT_TENANT_REQUESTS)
                error = rate_limited(
                    f"Rate limit reached for requests per minute on this API key: limit "
                    f"{limits.spec.requests_per_minute}. Retry in {format_duration(wait)}.",
                    wait)
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _with_headers(send: Send, limits: TenantLimits) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *limits.headers()]}
        await send(message)

    return send_with_headers
