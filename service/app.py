"""``create_app(settings)``: thin routes over ``Serving``; the engine starts and stops in the lifespan."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.config import Settings
from service.engine import Engine
from service.errors import NotReadyError, UnauthorizedError, install_handlers
from service.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from service.serving import Serving


def _auth(settings: Settings) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {settings.api_key.get_secret_value()}"
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise UnauthorizedError("missing or wrong API key: send 'Authorization: Bearer <key>'")

    return check


def create_app(settings: Settings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    engine = Engine(settings, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()  # loads in its own thread: /health answers at once, /ready once loaded
        yield
        engine.stop()

    app = FastAPI(title="onejump", version="0.1.0", lifespan=lifespan)
    app.state.engine, app.state.settings = engine, settings
    serving = Serving(engine, settings)
    install_handlers(app)
    guarded = [Depends(_auth(settings))]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", dependencies=guarded)
    async def ready() -> dict[str, str]:
        if not engine.ready:
            raise NotReadyError(engine.error or "loading the model")
        return {"status": "ready", "model": settings.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        body = generate_latest(engine.metrics.registry) if engine.metrics else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name)])

    @app.post("/v1/completions", dependencies=guarded, response_model=None)
    async def completions(req: CompletionRequest, request: Request) -> Any:
        return await serving.handle(req, request)

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=None)
    async def chat(req: ChatCompletionRequest, request: Request) -> Any:
        return await serving.handle(req, request)

    @app.get("/", include_in_schema=False)
    async def root() -> JSONResponse:
        return JSONResponse({"service": "onejump", "docs": "/docs", "model": settings.model_name})

    return app
