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
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization")
        if given is not None and self._matches(given):
            await self.app(scope, receive, send)
            return
        await unauthorized(missing=given is None).response()(scope, receive, send)

    def _matches(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken must not reveal how much of the key matched.
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
