"""The HTTP routes: OpenAI's API (models, completions, chat completions, embeddings, image generations, speech and
transcriptions), health, metrics, the chat page. Each handler parses its body with the protocol models (the
transcription upload with `parse_form`) and hands it to `OpenAIServing`.

Every error is OpenAI's JSON ({"error": {"message", "type", "param", "code"}}): malformed JSON 400, fields of the
wrong type or out of range 422, unsupported features and over-long prompts 400, an image that is not a PNG, JPEG or
WebP data URL within the caps (or sent to a text-only model) 400, audio that is not wav/flac/mp3/ogg within the
caps (or sent to a model without an audio tokenizer) 400, a drawing or speech request the model answered without a
complete image or audio span 422, unknown model 404, missing or
wrong API key 401 (every route but /health), a body slower than the read deadline 408, bodies over the limit 413,
a full queue 429, a server that is shutting down 503, a sequence that failed while generating 500 (the others are
unaffected). GET /openapi.json describes it all (request bodies included), behind the API key like the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..infer.engine import Engine
from .metrics import Metrics
from .middleware import BodyTimeout, BodyTooLarge, Guard, body_timed_out, error_response, too_large
from .protocol import (CLIENT_CLOSED, TRANSCRIPTION_FORMATS, APIError, ChatCompletionRequest, CompletionRequest,
                       EmbeddingRequest, ErrorResponse, ImageGenerationRequest, SpeechRequest, TranscriptionRequest,
                       check_unsupported, parse_form, parse_json_body, validation_error)
from .serving import WAKE_INTERVAL, AudioLimits, ImageLimits, OpenAIServing, ServedModel

ENGINE_WATCH_SECONDS = 0.5


def create_app(engine: Engine, base_name: str = "base", adapter_names: list[str] | None = None, *,
               api_key: str | None = None, max_body_bytes: int = 4 << 20, body_timeout: float | None = None,
               base_info: dict | None = None, on_engine_death: Callable[[], None] | None = None,
               image_limits: ImageLimits | None = None, audio_limits: AudioLimits | None = None,
               stream_interval: float = WAKE_INTERVAL):
    """The ASGI app (FastAPI inside the Guard middleware); it starts the engine at startup and stops it, after
    the last response, at shutdown. A request body must arrive within `body_timeout` seconds (else 408). If the
    engine's loop dies, /health answers 503 and `on_engine_death` is called (`serve` then exits non-zero, so
    that a process manager restarts it). `image_limits` and `audio_limits` cap the images and audio a request may
    send (multimodal models). The event loop takes the engine's tokens at most every `stream_interval` seconds."""
    models = {base_name: ServedModel(base_name, 0, base_info or {})}
    for index, name in enumerate(adapter_names or [], start=1):
        models[name] = ServedModel(name, index, engine.adapters[index - 1].info)
    metrics = Metrics(engine)
    serving = OpenAIServing(engine, models, metrics, image_limits, audio_limits, stream_interval)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        watcher = asyncio.ensure_future(_watch_engine(engine, on_engine_death))
        yield
        watcher.cancel()
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="fmforge", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json",
                  lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving
    add_error_handlers(app, max_body_bytes, body_timeout)
    add_routes(app, serving, metrics)
    app.openapi = lambda: openapi_schema(app, list(models), api_key is not None)
    return Guard(app, api_key, max_body_bytes, metrics, body_timeout)


async def _watch_engine(engine: Engine, on_death: Callable[[], None] | None) -> None:
    while engine.alive():
        await asyncio.sleep(ENGINE_WATCH_SECONDS)
    if on_death is not None:
        on_death()


def add_error_handlers(app: FastAPI, max_body_bytes: int, body_timeout: float | None) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, error):
        return error_response(too_large(max_body_bytes))

    @app.exception_handler(BodyTimeout)
    async def body_too_slow(request, error):
        return error_response(body_timed_out(body_timeout))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request, error):  # left while sending its body: nobody to answer, and no server error
        return Response(status_code=CLIENT_CLOSED)

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
    return validated(schema, parse_json_body(await request.body()))


def validated(schema: type[BaseModel], body: dict):
    try:
        parsed = schema.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    check_unsupported(parsed)
    return parsed


async def parse_upload(request: Request) -> tuple[TranscriptionRequest, tuple[str, bytes] | None]:
    """A transcription upload: its form fields as a TranscriptionRequest, and its 'file' part (filename, bytes)."""
    fields, files = parse_form(request.headers.get("content-type", ""), await request.body())
    if "model" not in fields and "model" in files:  # a client that sends every field as a file part
        fields["model"] = files["model"][1].decode("utf-8", "replace")
    return validated(TranscriptionRequest, fields), files.get("file")


ERRORS = {status: {"model": ErrorResponse, "description": description} for status, description in {
    400: "Malformed JSON, an unsupported feature or value, a prompt that does not fit, a bad or too large image",
    401: "Missing or wrong API key", 404: "Unknown model", 408: "The body did not arrive in time",
    413: "Body too large", 429: "The queue is full",
    422: "A field of the wrong type or out of range; or a drawing or speech the model ended without a complete "
         "image or audio span",
    500: "A sequence failed while generating", 503: "Shutting down, too many connections, or the engine stopped",
}.items()}


def json_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` declaring a JSON request body (the routes read the raw body themselves, for strict JSON)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def transcription_body(model_names: list[str]) -> dict:
    """The multipart request body of /v1/audio/transcriptions (the route reads the raw body itself)."""
    properties = {name: prop for name, prop in TranscriptionRequest.model_json_schema()["properties"].items()}
    properties["model"]["enum"] = model_names
    properties["response_format"]["enum"] = list(TRANSCRIPTION_FORMATS)
    properties["file"] = {"type": "string", "format": "binary", "description": "the audio: wav, flac, mp3 or ogg"}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": ["file", "model"]}}}}}


def openapi_schema(app: FastAPI, model_names: list[str], needs_key: bool) -> dict:
    """FastAPI's schema of the routes, plus the request models (with their nested models, `model` naming the
    served models) and the bearer key."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description="OpenAI-compatible API of fmforge serve")
        components = schema.setdefault("components", {})
        models = components.setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest, EmbeddingRequest, ImageGenerationRequest,
                      SpeechRequest):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            models.update(model_schema.pop("$defs", {}))
            model_schema["properties"]["model"]["enum"] = model_names
            models[model.__name__] = model_schema
        schema["paths"]["/v1/audio/transcriptions"]["post"].update(transcription_body(model_names))
        if needs_key:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            schema["paths"]["/health"]["get"]["security"] = []
        app.openapi_schema = schema
    return app.openapi_schema


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

    @app.get("/v1/models/{name}", responses={404: ERRORS[404]})
    async def get_model(name: str):
        return serving.get_model(name)

    @app.post("/v1/completions", openapi_extra=json_body(CompletionRequest), responses=ERRORS)
    async def completions(request: Request):
        return await serving.completions(await parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions", openapi_extra=json_body(ChatCompletionRequest), responses=ERRORS)
    async def chat_completions(request: Request):
        return await serving.chat(await parse(request, ChatCompletionRequest), request)

    @app.post("/v1/embeddings", openapi_extra=json_body(EmbeddingRequest), responses=ERRORS)
    async def embeddings(request: Request):
        return await serving.embeddings(await parse(request, EmbeddingRequest))

    @app.post("/v1/images/generations", openapi_extra=json_body(ImageGenerationRequest), responses=ERRORS)
    async def image_generations(request: Request):
        return await serving.images(await parse(request, ImageGenerationRequest), request)

    speech_answer = {200: {"description": "The speech: WAV, or raw 16-bit little-endian PCM at X-Sample-Rate Hz",
                           "content": {"audio/wav": {"schema": {"type": "string", "format": "binary"}},
                                       "audio/pcm": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/audio/speech", openapi_extra=json_body(SpeechRequest), responses={**ERRORS, **speech_answer},
              response_class=Response)
    async def audio_speech(request: Request):
        return await serving.speech(await parse(request, SpeechRequest), request)

    @app.post("/v1/audio/transcriptions", responses=ERRORS)
    async def audio_transcriptions(request: Request):
        body, file = await parse_upload(request)
        return await serving.transcriptions(body, file, request)

    page = resources.files("fmforge.serve").joinpath("static/chat.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)
