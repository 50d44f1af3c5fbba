"""The FastAPI application: routes, OpenAI-style errors, health, metrics and the chat page.

    GET  /                      the web chat page (static/index.html)
    GET  /v1/models             OpenAI model list (+ each model's state and capabilities)
    GET  /v1/models/{name}
    POST /v1/completions        OpenAI completions (stream: true -> server-sent events)
    POST /v1/chat/completions   OpenAI chat completions
    POST /v1/embeddings         OpenAI embeddings (text encoders: BERT family), float or base64
    GET  /health                ok / not ok; with the key (or no keys set): per-model state and figures
    GET  /metrics               Prometheus text format (an API key or the metrics key, when keys are set)
    GET  /openapi.json          the OpenAPI document (request and response schemas, limits, model names)

Keys, limits per request and per client address: security.py (a middleware in front of all this).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .completions import handle_completion
from .embeddings import file_capabilities, handle_embeddings
from .errors import APIError
from .metrics import Metrics
from .openapi import openapi_document
from .registry import Registry
from .security import Keys, Limits, SecurityMiddleware

log = logging.getLogger("pipeload.server")
STATIC = Path(__file__).parent / "static"


def _model_card(name: str, handle, created: int) -> dict:
    capabilities = handle.info.get("capabilities") or file_capabilities(handle.spec.path)
    return {"id": name, "object": "model", "created": created, "owned_by": "pipeload",
            "state": handle.state, "context_length": handle.info.get("context_length"), "capabilities": capabilities}


def create_app(registry: Registry, preload: bool = False, keys: Keys | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The ASGI app serving `registry`'s models behind `keys` and `limits` (default: open, default
    limits); its shutdown stops the workers."""
    keys, limits = keys or Keys(), limits or Limits()
    metrics = Metrics(registry)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if preload:
            for name in registry.handles:
                try:
                    await registry.acquire(name)
                except APIError as e:  # keep serving the others; /health shows the error
                    log.error("%s", e.message)
        try:
            yield
        finally:
            await registry.close()

    app = FastAPI(title="pipeload", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.registry, app.state.metrics, app.state.limits = registry, metrics, limits
    app.add_middleware(SecurityMiddleware, keys=keys, limits=limits)
    document = openapi_document(list(registry.handles), limits, keys.required)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, f"invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    async def completion(request: Request, kind: str, endpoint: str):
        try:
            response = await handle_completion(request, kind, registry, metrics, limits)
        except APIError as e:
            metrics.requests.labels(getattr(request.state, "model", "unknown"), endpoint, str(e.status)).inc()
            raise
        metrics.requests.labels(request.state.model, endpoint, "200").inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(request, "completion", "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await completion(request, "chat", "chat_completions")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        try:
            response = await handle_embeddings(request, registry, metrics, limits)
        except APIError as e:
            metrics.requests.labels(getattr(request.state, "model", "unknown"), "embeddings", str(e.status)).inc()
            raise
        metrics.requests.labels(request.state.model, "embeddings", "200").inc()
        return response

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(n, h, created) for n, h in registry.handles.items()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        return _model_card(name, registry.get(name), created)

    @app.get("/health")
    async def health(request: Request):
        models = {n: h.describe() for n, h in registry.handles.items()}
        ok = not registry.closing and all(m["state"] not in ("dead", "error") for m in models.values())
        body = {"status": "ok" if ok else "degraded" if not registry.closing else "shutting_down"}
        if request.state.authorized:  # paths, pids and figures only for those with a key
            body["models"] = models
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/openapi.json")
    async def openapi():
        return document

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app

