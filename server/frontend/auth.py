"""Bearer-token check as a plain ASGI middleware (no BaseHTTPMiddleware: it breaks streaming
disconnect detection). Health, version and metrics stay open so probes and Prometheus
need no secret."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.frontend.errors import APIError

OPEN_PATHS = ("/health", "/version", "/metrics")
OPEN_PREFIXES = ("/v2/health/",)


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def bearer_token(scope: Scope) -> bytes | None:
    """The token of `Authorization: Bearer <token>`; b"" for another scheme; None if absent."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return None


def unauthorized(missing: bool) -> APIError:
    """The 401 for a request without a key (`missing`) or with a wrong one."""
    if missing:
        error = APIError("You didn't provide an API key. Pass it in the Authorization "
                         "header as 'Bearer <key>'.", status=401, code="invalid_api_key")
    else:
        error = APIError("Incorrect API key provided.", status=401, code="invalid_api_key")
    error.headers = {"WWW-Authenticate": "Bearer"}
    return error


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        # compare_digest: the time taken must not reveal how much of the key matched.
        if token and hmac.compare_digest(token, self._key):
            await self.app(scope, receive, send)
            return
        await unauthorized(missing=token is None).response()(scope, receive, send)
