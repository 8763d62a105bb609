"""The HTTP layer: OpenAI's API (models, completions, chat completions, embeddings), health, metrics, chat page.

Every error is OpenAI's JSON ({"error": {"message", "type", "param", "code"}}): malformed JSON 400, fields of the
wrong type or out of range 422, unsupported features and over-long prompts 400, unknown model 404, missing or
wrong API key 401 (every route but /health), bodies over the limit 413, a full queue 429.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from importlib import resources

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import TokenizerError
from .engine import Engine, EngineFull, EngineStopped, Event, SamplingOptions
from .metrics import Metrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, check_unsupported,
                       validation_error)


@dataclass
class ServedModel:
    name: str
    adapter: int  # 0 = the base
    info: dict


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: API key on every route but /health, body size limit, request metrics."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]
        route = self.metrics.route(scope["path"])

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            if self.api_key and scope["path"] != "/health" and not self._authorized(headers.get("authorization")):
                challenge = 'Basic realm="fmforge"' if scope["path"] == "/" else "Bearer"
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 type="authentication_error", code="invalid_api_key",
                                 headers={"WWW-Authenticate": challenge})
                return await _error_response(error)(scope, receive, send_recording)
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return await _error_response(_too_large(self.max_body))(scope, receive, send_recording)
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise _BodyTooLarge()
                return message

            await self.app(scope, receive_limited, send_recording)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":  # the chat page in a browser: any user name, the key as password
            try:
                key = base64.b64decode(value.strip()).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        else:
            return False
        return hmac.compare_digest(key.encode(), self.api_key.encode())


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Stream(StreamingResponse):
    """An SSE response that stops its sequences when it ends for any reason (client gone included)."""

    def __init__(self, body, sequences: list, metrics: Metrics):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.sequences, self.metrics = sequences, metrics

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.metrics.cancelled.inc(_cancel(self.sequences))


def _cancel(sequences) -> int:
    stopped = 0
    for sequence in sequences:
        if not sequence.finished and not sequence.cancelled:
            sequence.cancel()
            stopped += 1
    return stopped


def create_app(engine: Engine, base_name: str = "base", adapter_names: list[str] | None = None, *,
               api_key: str | None = None, max_body_bytes: int = 4 << 20, base_info: dict | None = None):
    """The ASGI app (FastAPI inside the Guard middleware); it starts the engine at startup and stops it, after
    the last response, at shutdown."""
    tokenizer = engine.tokenizer
    models = {base_name: ServedModel(base_name, 0, base_info or {})}
    for index, name in enumerate(adapter_names or [], start=1):
        models[name] = ServedModel(name, index, engine.adapters[index - 1].info)
    created = int(time.time())
    chat_stops = tokenizer.chat_stop_ids()
    metrics = Metrics(engine)
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="fmforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    # ---- errors ---------------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return _error_response(error)

    @app.exception_handler(_BodyTooLarge)
    async def body_too_large(request, error):
        return _error_response(_too_large(max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        return _error_response(APIError(error.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request, error: Exception):
        return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error"))

    # ---- helpers --------------------------------------------------------------------------------------------

    async def parse(request: Request, schema: type[BaseModel]):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            parsed = schema.model_validate(body)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        check_unsupported(parsed)
        return parsed

    def pick(name: str) -> ServedModel:
        if name not in models:
            raise APIError(404, f"the model '{name}' does not exist; served models: {', '.join(models)}",
                           param="model", code="model_not_found")
        return models[name]

    def check_length(ids: list[int], param: str, reply: bool = True) -> None:
        """A prompt must leave room for at least one generated token (`reply`); an embedding input must fit."""
        if len(ids) > engine.max_context - reply:
            room = " (at least one must be left for the reply)" if reply else ""
            raise APIError(400, f"This model's maximum context length is {engine.max_context} tokens, but the "
                           f"{param} has {len(ids)} tokens{room}. Shorten it.",
                           param=param, code="context_length_exceeded")

    def options_for(body, max_tokens: int | None, logprobs: int | None) -> SamplingOptions:
        """The request's sampling settings; max_tokens is bounded per prompt in submit_all."""
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < engine.model.config.vocab_size:
                raise APIError(400, f"logit_bias key {key!r} is not a token id of this model", param="logit_bias")
            bias[int(key)] = max(-100.0, min(100.0, value))
        return SamplingOptions(
            max_tokens=max_tokens or engine.max_context,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(0, body.top_k or 0),
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=bias, seed=body.seed, stop=stop, logprobs=logprobs)

    def submit_all(prompts: list[list[int]], n: int, body, max_tokens, logprobs, adapter: int, stop_ids):
        """Submit n sequences per prompt; (queue, sequences). All or none: a full queue cancels the rest."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        requested = options_for(body, max_tokens, logprobs)
        sequences = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(n):
                    index = p * n + j
                    # n choices with one seed differ from each other, reproducibly.
                    options = dataclasses.replace(
                        requested, max_tokens=min(requested.max_tokens, engine.max_context - len(ids)),
                        seed=None if requested.seed is None else requested.seed + j)

                    def deliver(event: Event, index=index):
                        loop.call_soon_threadsafe(queue.put_nowait, (index, event))

                    sequences.append(engine.submit(ids, options, deliver, adapter, stop_ids))
        except EngineFull as exc:
            _cancel(sequences)
            metrics.rejected.inc()
            raise APIError(429, str(exc), type="rate_limit_error", code="rate_limit_exceeded") from None
        except EngineStopped as exc:
            _cancel(sequences)
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
        return queue, sequences

    async def next_event(queue: asyncio.Queue, request: Request, sequences: list):
        """The next (index, event); cancels the sequences if the client disconnects while we wait."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    metrics.cancelled.inc(_cancel(sequences))
                    raise asyncio.CancelledError() from None

    def finish_metrics(prompts: list[list[int]], completion_tokens: int) -> None:
        metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        metrics.completion_tokens.inc(completion_tokens)

    def engine_failed() -> APIError:
        return APIError(500, f"the engine stopped: {engine.error!r}", type="server_error")

    async def generate(request: Request, kind: str, body, prompts: list[list[int]], adapter: int, stop_ids,
                       max_tokens: int | None, logprobs: int | None):
        n = body.n
        queue, sequences = submit_all(prompts, n, body, max_tokens, logprobs, adapter, stop_ids)
        response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        header = {"id": response_id, "object": "chat.completion" if kind == "chat" else "text_completion",
                  "created": int(time.time()), "model": body.model}
        total = len(sequences)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return _Stream(_stream(kind, header, queue, sequences, total, prompts, include_usage, logprobs),
                           sequences, metrics)
        texts = [[] for _ in range(total)]
        logs = [[] for _ in range(total)]
        finish = [None] * total
        counts = [0] * total
        done = 0
        try:
            while done < total:
                index, event = await next_event(queue, request, sequences)
                if event.finish_reason == "error":
                    raise engine_failed()
                texts[index].append(event.text)
                if event.logprob is not None:
                    logs[index].append(event.logprob)
                counts[index] = event.completion_tokens
                if event.finish_reason:
                    finish[index], done = event.finish_reason, done + 1
        finally:
            metrics.cancelled.inc(_cancel(sequences))
        completion_tokens = sum(counts)
        finish_metrics(prompts, completion_tokens)
        usage = _usage(prompts, completion_tokens)
        choices = []
        for i in range(total):
            text = "".join(texts[i])
            if kind == "chat":
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "logprobs": _chat_logprobs(logs[i]) if logprobs is not None else None,
                          "finish_reason": finish[i]}
            else:
                choice = {"index": i, "text": text,
                          "logprobs": _completion_logprobs(logs[i], 0) if logprobs is not None else None,
                          "finish_reason": finish[i]}
            choices.append(choice)
        return JSONResponse({**header, "choices": choices, "usage": usage})

    async def _stream(kind, header, queue, sequences, total, prompts, include_usage, logprobs):
        chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {**header, "object": chunk_object}
        counts, offsets, done = [0] * total, [0] * total, 0
        if kind == "chat":
            for i in range(total):
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]})
        while done < total:
            index, event = await queue.get()
            if event.finish_reason == "error":
                yield _sse({"error": engine_failed().body()["error"]})
                return
            counts[index] = event.completion_tokens
            if event.finish_reason:
                done += 1
            if not event.text and event.finish_reason is None and event.logprob is None:
                continue
            entries = [event.logprob] if event.logprob is not None else []
            if kind == "chat":
                delta = {"content": event.text} if event.text or event.finish_reason is None else {}
                choice = {"index": index, "delta": delta,
                          "logprobs": _chat_logprobs(entries) if logprobs is not None else None,
                          "finish_reason": event.finish_reason}
            else:
                choice = {"index": index, "text": event.text,
                          "logprobs": (_completion_logprobs(entries, offsets[index]) if logprobs is not None
                                       else None),
                          "finish_reason": event.finish_reason}
                offsets[index] += len(event.text)
            yield _sse({**head, "choices": [choice]})
        finish_metrics(prompts, sum(counts))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompts, sum(counts))})
        yield "data: [DONE]\n\n"

    # ---- routes ---------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(engine.error)}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        data = [{"id": m.name, "object": "model", "created": created, "owned_by": "fmforge",
                 "root": base_name, "parent": None if m.adapter == 0 else base_name,
                 "max_model_len": engine.max_context,
                 **({"task": m.info.get("task")} if m.info.get("task") else {})} for m in models.values()]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        served = pick(name)
        return {"id": served.name, "object": "model", "created": created, "owned_by": "fmforge"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionRequest)
        served = pick(body.model)
        prompts = _prompt_ids(body.prompt, tokenizer, engine.model.config.vocab_size)
        for ids in prompts:
            check_length(ids, "prompt")
        return await generate(request, "completion", body, prompts, served.adapter, frozenset({tokenizer.eos_id}),
                              body.max_tokens, body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatCompletionRequest)
        served = pick(body.model)
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(
                part.text or "" for part in (m.content or []) if part.type == "text")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except TokenizerError as exc:
            raise APIError(400, f"the messages do not fit this model's chat template: {exc}",
                           param="messages") from None
        ids = tokenizer.encode(text, allow_special=True)
        check_length(ids, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return await generate(request, "chat", body, [ids], served.adapter, chat_stops,
                              body.max_completion_tokens or body.max_tokens, logprobs)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse(request, EmbeddingRequest)
        served = pick(body.model)
        width = engine.model.config.n_embd
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(400, f"this model's embeddings have {width} dimensions; 'dimensions' cannot change "
                           "that", param="dimensions")
        inputs = _prompt_ids(body.input, tokenizer, engine.model.config.vocab_size, param="input")
        for ids in inputs:
            check_length(ids, "input", reply=False)
        try:
            vectors = await asyncio.wrap_future(engine.embed(inputs, served.adapter))
        except EngineStopped as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from None
        data = []
        for i, vector in enumerate(vectors.numpy().astype(np.float32)):
            value = (base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                     if body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(ids) for ids in inputs)
        metrics.prompt_tokens.inc(tokens)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    page = resources.files("fmforge.serve").joinpath("static/chat.html").read_text("utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    return Guard(app, api_key, max_body_bytes, metrics)


def _prompt_ids(prompt, tokenizer, vocab_size: int, param: str = "prompt") -> list[list[int]]:
    """The prompts of a request as token lists: text gets the bos token in front, as in training."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, f"'{param}' is empty", param=param)
    result = []
    for p in prompt:
        if isinstance(p, str):
            ids = tokenizer.encode(p, add_bos=True)
            if not ids:  # an empty text, and a tokenizer without a bos token
                raise APIError(400, f"'{param}' holds an empty text", param=param)
            result.append(ids)
        else:
            if not p:
                raise APIError(400, f"'{param}' holds an empty token list", param=param)
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"token id {bad[0]} in '{param}' is outside this model's vocabulary "
                               f"(0..{vocab_size - 1})", param=param)
            result.append(list(p))
    return result


def _usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _completion_logprobs(entries, start_offset: int) -> dict:
    offsets, offset = [], start_offset
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def _chat_logprobs(entries) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}
