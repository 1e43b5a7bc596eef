"""build_app: the FastAPI application over an EngineClient. No globals; state on app.state.

This module must stay importable without torch (tests/test_layering.py checks it): the
engine, with the model, lives behind the EngineClient interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.frontend.auth import APIKeyMiddleware
from server.frontend.engine_client import EngineClient
from server.frontend.errors import install_exception_handlers
from server.frontend.metrics import HTTPMetricsMiddleware, Metrics, RouteTable
from server.frontend.routes import (
    health_router,
    metrics_router,
    openai_router,
    tokenizer_router,
)
from server.frontend.serving_chat import ChatServing
from server.frontend.serving_common import ServingContext
from server.frontend.serving_completions import CompletionServing
from server.frontend.tokenization import TokenizerService


def build_app(engine: EngineClient, tokenizer: Any, served_model_name: str,
              api_key: str | None, metrics: Metrics | None = None) -> FastAPI:
    """The HTTP app. `tokenizer` is a Hugging Face tokenizer (encode, decode,
    apply_chat_template); with `api_key` set every route but health, version and metrics
    needs `Authorization: Bearer <api_key>`. `metrics` (default: a fresh Metrics with
    `conveyor:` names only) is what GET /metrics exports."""
    if metrics is None:
        metrics = Metrics(served_model_name)
    tokens = TokenizerService(tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        tokens.close()

    app = FastAPI(title="Conveyor", lifespan=lifespan)
    ctx = ServingContext(engine=engine, tokenizer=tokens, served_model_name=served_model_name,
                         metrics=metrics)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.state.completions = CompletionServing(ctx)
    app.state.chat = ChatServing(ctx)

    install_exception_handlers(app)
    v1 = openai_router()
    mounts = [("/v1", v1),
              ("/openai/v1", v1),  # KServe serves OpenAI routes here
              ("", tokenizer_router()), ("", health_router()), ("", metrics_router())]
    for prefix, router in mounts:
        app.include_router(router, prefix=prefix)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    # Added last, so outermost: requests refused by auth are counted too.
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics,
                       routes=RouteTable([*((p, r.routes) for p, r in mounts),
                                          ("", app.router.routes)]))  # /docs etc.
    return app
