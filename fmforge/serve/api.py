"""The HTTP routes: OpenAI's API (models, completions, chat completions, embeddings), health, metrics, the chat
page. Each handler parses its body with the protocol models and hands it to `OpenAIServing`.

Every error is OpenAI's JSON ({"error": {"message", "type", "param", "code"}}): malformed JSON 400, fields of the
wrong type or out of range 422, unsupported features and over-long prompts 400, unknown model 404, missing or
wrong API key 401 (every route but /health), bodies over the limit 413, a full queue 429, a server that is shutting
down 503, a sequence that failed while generating 500 (the others are unaffected).
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.engine import Engine
from .metrics import Metrics
from .middleware import BodyTooLarge, Guard, error_response, too_large
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, check_unsupported,
                       parse_json_body, validation_error)
from .serving import OpenAIServing, ServedModel

ENGINE_WATCH_SECONDS = 0.5


def create_app(engine: Engine, base_name: str = "base", adapter_names: list[str] | None = None, *,
               api_key: str | None = None, max_body_bytes: int = 4 << 20, base_info: dict | None = None,
               on_engine_death: Callable[[], None] | None = None):
    """The ASGI app (FastAPI inside the Guard middleware); it starts the engine at startup and stops it, after
    the last response, at shutdown. If the engine's loop dies, /health answers 503 and `on_engine_death` is
    called (the server then exits non-zero, so that a process manager restarts it)."""
    models = {base_name: ServedModel(base_name, 0, base_info or {})}
    for index, name in enumerate(adapter_names or [], start=1):
        models[name] = ServedModel(name, index, engine.adapters[index - 1].info)
    metrics = Metrics(engine)
    serving = OpenAIServing(engine, models, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        watcher = asyncio.ensure_future(_watch_engine(engine, on_engine_death))
        yield
        watcher.cancel()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="fmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving
    add_error_handlers(app, max_body_bytes)
    add_routes(app, serving, metrics)
    return Guard(app, api_key, max_body_bytes, metrics)


async def _watch_engine(engine: Engine, on_death: Callable[[], None] | None) -> None:
    while engine.alive():
        await asyncio.sleep(ENGINE_WATCH_SECONDS)
    if on_death is not None:
        on_death()


def add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, error):
        return error_response(too_large(max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        return error_response(APIError(error.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))


async def parse(request: Request, schema: type[BaseModel]):
    """The body as `schema`: strict JSON, then the protocol model's own validation, then unsupported fields."""
    body = parse_json_body(await request.body())
    try:
        parsed = schema.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    check_unsupported(parsed)
    return parsed


def add_routes(app: FastAPI, serving: OpenAIServing, metrics: Metrics) -> None:
    engine = serving.engine

    @app.get("/health")
    async def health():
        if not engine.alive():
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return serving.list_models()

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        return serving.get_model(name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serving.completions(await parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serving.chat(await parse(request, ChatCompletionRequest), request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await serving.embeddings(await parse(request, EmbeddingRequest))

    page = resources.files("fmforge.serve").joinpath("static/chat.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)
