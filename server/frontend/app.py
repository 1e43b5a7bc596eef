"""build_app: the FastAPI application over an EngineClient. No globals; state on app.state.

This module must stay importable without torch (tests/test_layering.py checks it): the
engine, with the model, lives behind the EngineClient interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.frontend.admission import Admission, AdmissionMiddleware
from server.frontend.auth import APIKeyMiddleware
from server.frontend.engine_client import EngineClient
from server.frontend.errors import install_exception_handlers
from server.frontend.lifecycle import Lifecycle, LifecycleMiddleware
from server.frontend.metrics import HTTPMetricsMiddleware, Metrics, RouteTable
from server.frontend.request_limits import RequestLimits, max_token_bytes
from server.frontend.request_log import RecordingMetrics
from server.frontend.routes import (
    health_router,
    metrics_router,
    openai_router,
    tokenizer_router,
)
from server.frontend.serving_chat import ChatServing
from server.frontend.serving_common import ServingContext
from server.frontend.serving_completions import CompletionServing
from server.frontend.tenants import TenantMiddleware, Tenants
from server.frontend.tokenization import TokenizerService


def build_app(engine: EngineClient, tokenizer: Any, served_model_name: str,
              api_key: str | None, metrics: Metrics | None = None, *,
              lifecycle: Lifecycle | None = None, log_json: bool = False,
              log_prompts: bool = False, limits: RequestLimits | None = None,
              tenants: Tenants | None = None) -> FastAPI:
    """The HTTP app. `tokenizer` is a Hugging Face tokenizer (encode, decode,
    apply_chat_template); with `api_key` set every route but health, version and metrics
    needs `Authorization: Bearer <api_key>`. `metrics` (default: a fresh Metrics with
    `conveyor:` names only) is what GET /metrics exports. `lifecycle` (default: a fresh
    one, on app.state.lifecycle) is what a graceful shutdown drains; `log_json` logs one
    JSON line per finished request, with the prompt too under `log_prompts`. `limits`
    (default: RequestLimits()) bound requests and the front-end queue; with `tenants` (the
    --api-keys-file) its keys authenticate and are rate-limited, and `api_key` becomes an
    unlimited admin key."""
    if metrics is None:
        metrics = Metrics(served_model_name)
    if lifecycle is None:
        lifecycle = Lifecycle()
    tokens = TokenizerService(tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        tokens.close()

    app = FastAPI(title="Conveyor", lifespan=lifespan)
    # The wrapper records token counts and TTFT for the request log; the series are the same.
    limits = limits or RequestLimits()
    admission = Admission(limits, max_token_bytes=max_token_bytes(tokenizer), metrics=metrics)
    ctx = ServingContext(engine=engine, tokenizer=tokens, served_model_name=served_model_name,
                         metrics=RecordingMetrics(metrics),  # type: ignore[arg-type]
                         limits=limits, admission=admission)
    app.state.ctx = ctx
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.completions = CompletionServing(ctx)
    app.state.chat = ChatServing(ctx)

    install_exception_handlers(app)
    v1 = openai_router()
    mounts = [("/v1", v1),
              ("/openai/v1", v1),  # KServe serves OpenAI routes here
              ("", tokenizer_router()), ("", health_router()), ("", metrics_router())]
    for prefix, router in mounts:
        app.include_router(router, prefix=prefix)
    # Inside auth: bodies of unauthenticated requests are never read.
    app.add_middleware(AdmissionMiddleware, admission=admission)
    if tenants is not None:
        app.add_middleware(TenantMiddleware, tenants=tenants, admin_key=api_key,
                           on_reject=admission.reject)
    elif api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    routes = RouteTable([*((p, r.routes) for p, r in mounts),
                         ("", app.router.routes)])  # /docs etc.
    # Outside auth, so refused requests get an id and a log line too.
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle, routes=routes,
                       served_model_name=served_model_name, log_json=log_json,
                       log_prompts=log_prompts)
    # Added last, so outermost: requests refused by auth or by a drain are counted too.
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, routes=routes)
    return app
