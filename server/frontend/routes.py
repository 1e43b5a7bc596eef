"""HTTP routes: thin handlers that parse the body, call the serving classes, pick a response.

Routers are built by functions (not module globals) so every app gets its own. Bodies are
read and validated here rather than by FastAPI so that malformed JSON, invalid UTF-8 and
wrong types all become the same OpenAI-shaped 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from server.frontend.errors import APIError, engine_dead_error, engine_not_ready_error, parse_body
from server.frontend.metrics import Metrics
from server.frontend.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.frontend.serving_chat import ChatServing, messages_to_dicts
from server.frontend.serving_common import ServingContext, check_token_ids, now
from server.frontend.serving_completions import CompletionServing


def _ctx(request: Request) -> ServingContext:
    return request.app.state.ctx


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return Response(result.model_dump_json(), media_type="application/json")
    # no-cache / no buffering: proxies must pass each event through as it is produced.
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The request body for the OpenAPI schema (/docs, fuzzers): the handlers read the raw
    body themselves, which hides it from FastAPI. Sub-models are inlined so the schema is
    self-contained."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": inline(schema)}}}}


def _model_card(ctx: ServingContext) -> ModelCard:
    return ModelCard(id=ctx.served_model_name, created=now(), root=ctx.served_model_name,
                     max_model_len=ctx.engine.info.max_model_len or None)


def openai_router() -> APIRouter:
    """The /v1 routes; the app mounts them at /v1 and, for KServe, at /openai/v1."""
    router = APIRouter()

    @router.post("/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await request.body())
        serving: CompletionServing = request.app.state.completions
        return _respond(await serving.create(req, request))

    @router.post("/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await request.body())
        serving: ChatServing = request.app.state.chat
        return _respond(await serving.create(req, request))

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        return _respond(ModelList(data=[_model_card(_ctx(request))]))

    @router.get("/models/{model_id:path}")
    async def get_model(request: Request, model_id: str) -> Response:
        ctx = _ctx(request)
        ctx.check_model(model_id)
        return _respond(_model_card(ctx))

    return router


def tokenizer_router() -> APIRouter:
    router = APIRouter()

    @router.post("/tokenize", openapi_extra=_json_body(TokenizeRequest))
    async def tokenize(request: Request) -> Response:
        ctx = _ctx(request)
        req = parse_body(TokenizeRequest, await request.body())
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("Give exactly one of prompt or messages.", param="prompt")
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            text = req.prompt
        else:
            add_special = bool(req.add_special_tokens)
            add_gen = True if req.add_generation_prompt is None else req.add_generation_prompt
            text = await ctx.tokenizer.render_chat(messages_to_dicts(req.messages or []),
                                                   add_gen)
        ids = await ctx.tokenizer.encode(text, add_special_tokens=add_special)
        return _respond(TokenizeResponse(count=len(ids), tokens=ids,
                                         max_model_len=ctx.engine.info.max_model_len))

    @router.post("/detokenize", openapi_extra=_json_body(DetokenizeRequest))
    async def detokenize(request: Request) -> Response:
        ctx = _ctx(request)
        req = parse_body(DetokenizeRequest, await request.body())
        ctx.check_model(req.model)
        # Until the engine reports its vocabulary, the tokenizer's own size is the bound.
        vocab = ctx.engine.info.vocab_size or len(ctx.tokenizer.tokenizer)
        check_token_ids(req.tokens, vocab, "tokens")
        try:
            text = await ctx.tokenizer.decode(req.tokens)
        except Exception as exc:  # ids inside the model's vocab but past the tokenizer's
            raise APIError(f"These tokens cannot be decoded: {exc}", param="tokens") from None
        return _respond(DetokenizeResponse(prompt=text))

    return router


def health_router() -> APIRouter:
    """Liveness/readiness for load balancers, plus the KServe open-inference-protocol ones."""
    router = APIRouter()

    def readiness(ctx: ServingContext) -> APIError | None:
        if ctx.engine.is_dead():
            return engine_dead_error()
        if not ctx.engine.is_ready():
            return engine_not_ready_error()
        return None

    @router.get("/health")
    async def health(request: Request) -> Response:
        error = readiness(_ctx(request))
        return error.response() if error else Response(status_code=200)

    @router.get("/version")
    async def version() -> Response:
        try:
            v = metadata.version("conveyor")
        except metadata.PackageNotFoundError:
            v = "unknown"
        return JSONResponse({"version": v})

    @router.get("/internal/stats")
    async def stats(request: Request) -> Response:
        """Engine occupancy (running, waiting, KV usage...) for tests and operators."""
        ctx = _ctx(request)
        error = readiness(ctx)
        return error.response() if error else JSONResponse(await ctx.engine.get_stats())

    @router.get("/v2/health/live")
    async def live() -> Response:
        return JSONResponse({"live": True})

    @router.get("/v2/health/ready")
    async def ready(request: Request) -> Response:
        error = readiness(_ctx(request))
        return error.response() if error else JSONResponse({"ready": True})

    @router.get("/v2/models/{name}/ready")
    async def model_ready(request: Request, name: str) -> Response:
        ctx = _ctx(request)
        ctx.check_model(name)
        error = readiness(ctx)
        return error.response() if error else JSONResponse({"name": name, "ready": True})

    return router


def metrics_router() -> APIRouter:
    """GET /metrics: Prometheus text format, open even with an API key (like vLLM)."""
    router = APIRouter()

    @router.get("/metrics")
    async def metrics(request: Request) -> Response:
        ctx = _ctx(request)
        m: Metrics = request.app.state.metrics
        stats = None
        # prometheus_client collects synchronously: fetch the engine's numbers first.
        if ctx.engine.is_ready() and not ctx.engine.is_dead():
            try:
                stats = await ctx.engine.get_stats()
            except Exception:  # noqa: BLE001 - engine died mid-scrape: request series only
                stats = None
        return Response(m.render(stats), media_type=CONTENT_TYPE_LATEST)

    return router
