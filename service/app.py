"""``create_app(settings)``: thin routes over ``Serving``; the engine starts and stops in the lifespan."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.config import Settings
from service.docs import docs_page, published_openapi
from service.engine import Worker
from service.errors import NotReadyError, install_handlers, send_error
from service.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from service.serving import Serving
from shortcuts import __version__

OPEN_PATHS = ("/health", "/metrics")  # liveness probes and Prometheus need no key (and answer during a drain)
# what the OpenAPI schema publishes for the completion routes (a stream is text/event-stream)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what} for code, what in (
        (400, "bad input"), (401, "missing or wrong API key"), (404, "unknown model name"),
        (413, "request body too large"), (429, "queue full"), (503, "loading or shutting down"),
        (504, "queued past the request timeout"))}


_METRICS: dict[int | str, dict[str, Any]] = {200: {
    "description": "Prometheus text exposition format (every onejump_* series, plus process and platform), not JSON",
    "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}}


def _published(model: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "content": {"text/event-stream": {}}}, **_ERRORS}


class ApiKeyMiddleware:
    """With a key set, every route but ``OPEN_PATHS`` (docs and unknown paths included) needs
    ``Authorization: Bearer <key>`` (scheme in any case), checked before the body is read."""

    def __init__(self, app: ASGIApp, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        return await send_error(send, 401, "authentication_error",
                                "missing or wrong API key: send 'Authorization: Bearer <key>'")


class DrainMiddleware:
    """Once shutdown began (SIGTERM), every request but ``OPEN_PATHS`` gets 503 with the OpenAI error
    body at once, before its body is read: the socket stays open until the running requests end."""

    def __init__(self, app: ASGIApp, engine: Worker):
        self.app, self.engine = app, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.engine.draining and scope["path"] not in OPEN_PATHS:
            return await send_error(send, 503, "service_unavailable", "the server is shutting down; retry on "
                                    "another replica or once it is back")
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses a body over ``limit`` bytes with 413: at once from its Content-Length, or while a
    chunked body arrives; never buffers more than the limit."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"the request body exceeds this server's limit of {self.limit} bytes (ONEJUMP_MAX_BODY_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await send_error(send, 413, "invalid_request_error", self._message())
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self._message())  # the handlers turn it into the error body
            return message

        return await self.app(scope, limited, send)


def _info_routes(app: FastAPI, engine: Worker, serving: Serving) -> None:
    """Models (served names and aliases, each with a card), version, tokenizer and the docs page."""
    settings = serving.settings
    created = int(time.time())  # the model cards' stable creation time: the server's start

    def card(name: str) -> ModelCard:
        ready = engine.ready and engine.exit_policy is not None
        length = engine.model.context_length if ready else None
        exits = engine.exit_policy.report() if ready and engine.exit_policy is not None else None
        weights = engine.model.weights_report() if ready else None
        return ModelCard(id=name, created=created, root=settings.model, max_model_len=length, early_exit=exits,
                         weights=weights)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[card(name) for name in settings.served_names])

    @app.get("/v1/models/{model_id:path}", responses={404: {"model": ErrorResponse}})
    async def model(model_id: str) -> ModelCard:
        serving.check_model(model_id)
        return card(model_id)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.post("/tokenize", responses={**_ERRORS})
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        engine.check_admitting()
        serving.check_model(req.model)
        return await asyncio.to_thread(serving.tokenize, req)

    @app.post("/detokenize", responses={**_ERRORS})
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        engine.check_admitting()
        serving.check_model(req.model)
        return await asyncio.to_thread(serving.detokenize, req)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return Response(docs_page(app.openapi()), media_type="text/html")


def create_app(settings: Settings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    engine = Worker(settings, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()  # loads in its own thread: /health answers at once, /ready once loaded
        yield
        await asyncio.to_thread(engine.stop)  # cancels what still runs, off the event loop

    # /docs is a self-contained page (no CDN assets: it works offline); no /redoc, which needs a CDN
    app = FastAPI(title="onejump", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings = engine, settings
    serving = Serving(engine, settings)
    install_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(DrainMiddleware, engine=engine)
    if settings.api_key is not None:  # added last: runs first, before the body is read or validated
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key.get_secret_value())

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        if not engine.ready:
            raise NotReadyError(engine.error or "loading the model")
        if engine.draining:
            raise NotReadyError("the server is shutting down")
        return {"status": "ready", "model": settings.model_name}

    @app.get("/metrics", response_class=Response, responses=_METRICS)
    async def metrics() -> Response:
        body = generate_latest(engine.metrics.registry) if engine.metrics else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    _info_routes(app, engine, serving)

    @app.post("/v1/completions", response_model=None, responses=_published(CompletionResponse))
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await serving.handle(req, request)

    @app.post("/v1/chat/completions", response_model=None, responses=_published(ChatCompletionResponse))
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        return await serving.handle(req, request)

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"service": "onejump", "docs": "/docs", "model": settings.model_name})

    app.openapi = lambda: published_openapi(app)  # type: ignore[method-assign]
    return app
