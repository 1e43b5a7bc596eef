"""OpenAI-shaped errors: one exception type for the serving code, handlers for FastAPI.

Every failure leaves the server as `{"error": {"message", "type", "param", "code"}}` with
`code` a string or null, so OpenAI clients can always parse it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.frontend.engine_client import EngineDeadError

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class APIError(Exception):
    """An error the client should see, with its HTTP status and OpenAI error fields."""

    def __init__(self, message: str, *, status: int = 400, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def engine_dead_error() -> APIError:
    return APIError("The engine has stopped; the server cannot serve requests.",
                    status=503, type=SERVER_ERROR, code="engine_dead")


def engine_not_ready_error() -> APIError:
    return APIError("The model is still loading; retry shortly.", status=503,
                    type=SERVER_ERROR, code="engine_not_ready")


def internal_error() -> APIError:
    # The message is deliberately generic: stack traces stay in the server log.
    return APIError("Internal server error.", status=500, type=SERVER_ERROR)


def to_api_error(exc: BaseException) -> APIError:
    """Maps an exception raised while serving to what the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return engine_dead_error()
    logger.error("unexpected error while serving a request", exc_info=exc)
    return internal_error()


def validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    """A 400 naming the first offending field; malformed JSON gets its own message."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError("The request body is not valid JSON.", code="invalid_json")
    if not errors:
        return APIError("Invalid request.")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if not loc:
        return APIError("The request body must be a JSON object.")
    param = str(loc[0])
    if first.get("type") == "missing" and len(loc) == 1:
        return APIError(f"Missing required parameter: '{param}'.", param=param)
    return APIError(f"Invalid value for '{param}': {first.get('msg', 'invalid value')}.",
                    param=param)


def parse_body(model: type, body: bytes) -> Any:
    """Validates a raw body against a pydantic model, raising an APIError on any defect."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError("The request body is not valid UTF-8.", code="invalid_encoding") from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def install_exception_handlers(app: FastAPI) -> None:
    """Replaces FastAPI's default error bodies with OpenAI-shaped ones."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def on_http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        etype = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
        return JSONResponse(error_body(message, etype), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc).response()

    async def on_engine_dead(_: Request, exc: Exception) -> JSONResponse:
        return engine_dead_error().response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(EngineDeadError, on_engine_dead)
    app.add_exception_handler(Exception, on_unexpected)


def sse_error_event(exc: BaseException) -> str:
    """An error that happens after a stream began: one SSE event with the error body."""
    return f"data: {json.dumps(to_api_error(exc).body())}\n\n"
