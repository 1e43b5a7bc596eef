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
from server.frontend.routes import health_router, openai_router, tokenizer_router
from server.frontend.serving_chat import ChatServing
from server.frontend.serving_common import ServingContext
from server.frontend.serving_completions import CompletionServing
from server.frontend.tokenization import TokenizerService


def build_app(engine: EngineClient, tokenizer: Any, served_model_name: str,
              api_key: str | None) -> FastAPI:
    """The HTTP app. `tokenizer` is a Hugging Face tokenizer (encode, decode,
    apply_chat_template); with `api_key` set every route but health and version needs
    `Authorization: Bearer <api_key>`."""
    tokens = TokenizerService(tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        tokens.close()

    app = FastAPI(title="Conveyor", lifespan=lifespan)
    ctx = ServingContext(engine=engine, tokenizer=tokens, served_model_name=served_model_name)
    app.state.ctx = ctx
    app.state.completions = CompletionServing(ctx)
    app.state.chat = ChatServing(ctx)

    install_exception_handlers(app)
    v1 = openai_router()
    app.include_router(v1, prefix="/v1")
    app.include_router(v1, prefix="/openai/v1")  # KServe serves OpenAI routes here
    app.include_router(tokenizer_router())
    app.include_router(health_router())
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app
