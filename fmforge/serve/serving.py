"""Turning OpenAI requests into engine work and engine events into OpenAI responses (vLLM's "serving" layer).

`OpenAIServing` holds the engine and the table of served models. Each endpoint family has one method that
validates what the protocol models cannot (model name, prompt lengths, content parts), submits every sequence of
the request to the engine at once (all or none), and answers either as one JSON body or as server-sent events.

A request is one unit: when one of its sequences fails, or the client goes away (streaming or not, waiting in the
queue or running), all of its sequences are cancelled. A failed sequence answers 500 in OpenAI's error format (a
stream ends with an error event, then [DONE]); the engine goes on serving everyone else.

While the server drains (SIGTERM, `start_draining`), requests in flight go on until the drain deadline; then a
stream ends with an error event and [DONE], and a request that is not streamed answers 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import GenerationError, TokenizerError
from ..infer.engine import Engine, EngineStopped, Event, Sequence
from .metrics import Metrics
from .protocol import CLIENT_CLOSED, APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest

logger = logging.getLogger("uvicorn.error")  # the server's error log (uvicorn's handler, level and repeat filter)


@dataclass
class ServedModel:
    name: str
    adapter: int  # 0 = the base
    info: dict


class ClientDisconnected(Exception):
    """The client went away before its answer was complete."""


class DrainDeadline(Exception):
    """The server is shutting down and the drain deadline has passed."""


@dataclass
class _Job:
    """The sequences of one request and the queue their events arrive on (index = prompt x n + choice)."""
    kind: str  # "chat" | "completion"
    body: ChatCompletionRequest | CompletionRequest
    prompts: list[list[int]]
    sequences: list[Sequence]
    events: asyncio.Queue
    logprobs: int | None

    @property
    def header(self) -> dict:
        return {"id": ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.body.model}


def cancel_all(sequences: list[Sequence]) -> int:
    """Cancel the unfinished sequences; how many there were."""
    stopped = 0
    for sequence in sequences:
        if not sequence.finished and not sequence.cancelled:
            sequence.cancel()
            stopped += 1
    return stopped


class OpenAIServing:
    def __init__(self, engine: Engine, models: dict[str, ServedModel], metrics: Metrics):
        self.engine, self.models, self.metrics = engine, models, metrics
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.model.config.vocab_size
        self.chat_stops = self.tokenizer.chat_stop_ids()
        self.created = int(time.time())
        self.draining_deadline: float | None = None  # time.monotonic() after which requests in flight are ended
        self._drain_signal: asyncio.Future | None = None  # resolved when draining starts (wakes idle waiters)

    def start_draining(self, seconds: float) -> None:
        """The server is shutting down: requests in flight may go on for `seconds` more (call on the event loop)."""
        self.draining_deadline = time.monotonic() + seconds
        signal = self.drain_signal()
        if not signal.done():
            signal.set_result(None)

    def drain_signal(self) -> asyncio.Future:
        if self._drain_signal is None:
            self._drain_signal = asyncio.get_running_loop().create_future()
        return self._drain_signal

    # ---- models ----------------------------------------------------------------------------------------------

    def pick(self, name: str) -> ServedModel:
        if name not in self.models:
            raise APIError(404, f"the model '{name}' does not exist; served models: {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[name]

    def list_models(self) -> dict:
        base = next(iter(self.models))
        data = [{"id": m.name, "object": "model", "created": self.created, "owned_by": "fmforge",
                 "root": base, "parent": None if m.adapter == 0 else base, "max_model_len": self.engine.max_context,
                 **({"task": m.info.get("task")} if m.info.get("task") else {})} for m in self.models.values()]
        return {"object": "list", "data": data}

    def get_model(self, name: str) -> dict:
        served = self.pick(name)
        return {"id": served.name, "object": "model", "created": self.created, "owned_by": "fmforge"}

    # ---- completions and chat ---------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        served = self.pick(body.model)
        prompts = self.prompt_ids(body.prompt, "prompt")
        for ids in prompts:
            self.check_length(ids, "prompt")
        job = self.submit("completion", body, prompts, served.adapter, frozenset({self.tokenizer.eos_id}),
                          body.max_tokens, body.logprobs)
        return await self.respond(job, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        served = self.pick(body.model)
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, str):
                content = m.content
            else:
                for j, part in enumerate(m.content):
                    if part.type != "text":
                        raise APIError(400, f"content parts of type '{part.type}' are not supported by this model "
                                       "(it reads text only)", param=f"messages.{i}.content.{j}.type",
                                       code="unsupported_content_type")
                    if part.text is None:
                        raise APIError(400, "a text content part needs 'text'", param=f"messages.{i}.content.{j}.text")
                content = "".join(part.text for part in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except TokenizerError as exc:
            raise APIError(400, f"the messages do not fit this model's chat template: {exc}",
                           param="messages") from None
        self.check_length(ids, "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = self.submit("chat", body, [ids], served.adapter, self.chat_stops,
                          body.max_completion_tokens or body.max_tokens, logprobs)
        return await self.respond(job, request)

    def submit(self, kind: str, body, prompts: list[list[int]], adapter: int, stop_ids: frozenset[int],
               max_tokens: int | None, logprobs: int | None) -> _Job:
        """Submit n sequences per prompt, all or none: a request the server can never hold is a 400, one that does
        not fit now (free slots + free places in the queue) a 429."""
        total = len(prompts) * body.n
        engine = self.engine
        capacity = engine.max_batch + engine.max_queue
        if total > capacity:
            raise APIError(400, f"this request asks for {total} sequences (prompts x n); this server holds at most "
                           f"{capacity} at once (--max-batch + --max-queue)", param="n", code="too_many_sequences")
        params = []
        for ids in prompts:
            room = self.engine.max_context - len(ids)
            if max_tokens is not None and max_tokens > room:
                raise APIError(400, f"This model's maximum context length is {self.engine.max_context} tokens; the "
                               f"prompt has {len(ids)} tokens and max_tokens asks for {max_tokens} more. Lower "
                               "max_tokens or shorten the prompt.", param="max_tokens", code="context_length_exceeded")
            params.append(body.to_sampling_params(self.vocab_size, max_tokens or room, logprobs))
        # Sequences wait in the engine's queue until its thread admits them, free slots or not, so the engine's own
        # bound (max_queue waiting) would refuse n = 5 on an idle server with --max-queue 4. Only this thread
        # submits, and the engine only takes from the queue, so the check holds until the submissions below.
        room = engine.max_queue + max(0, engine.max_batch - engine.running) - engine.waiting
        if total > room:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is at capacity ({engine.running} running, {engine.waiting} waiting; "
                           f"this request needs {total} places); retry later", type="rate_limit_error",
                           code="rate_limit_exceeded")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        sequences: list[Sequence] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(body.n):
                    def deliver(event: Event, index=p * body.n + j):
                        loop.call_soon_threadsafe(events.put_nowait, (index, event))

                    sequences.append(engine.submit(ids, params[p], deliver, adapter, stop_ids, seed_offset=j,
                                                   bounded=False))
        except EngineStopped as exc:
            cancel_all(sequences)
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        except GenerationError as exc:
            cancel_all(sequences)
            raise APIError(400, str(exc)) from None
        return _Job(kind, body, prompts, sequences, events, logprobs)

    async def respond(self, job: _Job, request: Request) -> Response:
        if job.body.stream:
            return _Stream(self.stream(job), job.sequences, self.metrics)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            return await self.collect(job, watcher)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            watcher.cancel()
            self.metrics.cancelled.inc(cancel_all(job.sequences))

    async def collect(self, job: _Job, watcher: asyncio.Future) -> JSONResponse:
        total = len(job.sequences)
        texts, logs = [[] for _ in range(total)], [[] for _ in range(total)]
        finish, counts, done = [None] * total, [0] * total, 0
        while done < total:
            try:
                index, event = await self.next_event(job, watcher)
            except DrainDeadline:
                raise APIError(503, "the server is shutting down and stopped this request at its drain deadline",
                               type="server_error", code="drain_timeout") from None
            if event.finish_reason == "error":
                self.log_failure(job, event)
                raise APIError(500, f"generation failed: {event.error}", type="server_error", code="generation_failed")
            texts[index].append(event.text)
            if event.logprob is not None:
                logs[index].append(event.logprob)
            counts[index] = event.completion_tokens
            if event.finish_reason:
                finish[index], done = event.finish_reason, done + 1
        self.count_tokens(job.prompts, sum(counts))
        choices = []
        for i in range(total):
            text = "".join(texts[i])
            if job.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": chat_logprobs(logs[i]) if job.logprobs is not None else None,
                                "finish_reason": finish[i]})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": completion_logprobs(logs[i], 0) if job.logprobs is not None else None,
                                "finish_reason": finish[i]})
        return JSONResponse({**job.header, "choices": choices, "usage": usage(job.prompts, sum(counts))})

    async def stream(self, job: _Job):
        """Server-sent events: a chunk per piece of text, then usage if asked for, then [DONE]."""
        head = {**job.header, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion"}
        total = len(job.sequences)
        include_usage = bool((job.body.stream_options or {}).get("include_usage"))
        counts, offsets, done = [0] * total, [0] * total, 0
        if job.kind == "chat":
            for i in range(total):
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        while done < total:
            try:
                index, event = await self.next_event(job)
            except DrainDeadline:
                yield sse(APIError(503, "the server is shutting down and stopped this stream at its drain deadline",
                                   type="server_error", code="drain_timeout").body())
                yield "data: [DONE]\n\n"
                return
            if event.finish_reason == "error":
                self.log_failure(job, event)
                yield sse(APIError(500, f"generation failed: {event.error}", type="server_error",
                                   code="generation_failed").body())
                yield "data: [DONE]\n\n"
                return
            counts[index] = event.completion_tokens
            if event.finish_reason:
                done += 1
            if not event.text and event.finish_reason is None and event.logprob is None:
                continue
            entries = [event.logprob] if event.logprob is not None else []
            if job.kind == "chat":
                delta = {"content": event.text} if event.text or event.finish_reason is None else {}
                choice = {"index": index, "delta": delta,
                          "logprobs": chat_logprobs(entries) if job.logprobs is not None else None,
                          "finish_reason": event.finish_reason}
            else:
                choice = {"index": index, "text": event.text,
                          "logprobs": completion_logprobs(entries, offsets[index]) if job.logprobs is not None
                          else None, "finish_reason": event.finish_reason}
                offsets[index] += len(event.text)
            yield sse({**head, "choices": [choice]})
        self.count_tokens(job.prompts, sum(counts))
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(job.prompts, sum(counts))})
        yield "data: [DONE]\n\n"

    async def next_event(self, job: _Job, watcher: asyncio.Future | None = None) -> tuple[int, Event]:
        """The job's next (sequence index, event). ClientDisconnected once `watcher` (the client's disconnect) is
        done; DrainDeadline once the drain deadline has passed, even for a job still waiting in the queue."""
        while True:
            if watcher is not None and watcher.done():
                raise ClientDisconnected()
            if not job.events.empty():
                return job.events.get_nowait()
            if self.draining_deadline is not None and time.monotonic() >= self.draining_deadline:
                raise DrainDeadline()
            getter = asyncio.ensure_future(job.events.get())
            waits = {getter} | {w for w in (watcher, self.drain_signal()) if w is not None and not w.done()}
            try:
                await asyncio.wait(waits, timeout=self.wait_seconds(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()  # the queue keeps its item for the next get
            if getter.done() and not getter.cancelled():
                return getter.result()

    def wait_seconds(self) -> float | None:
        """How long a request may wait for its next event: unbounded, except while draining."""
        if self.draining_deadline is None:
            return None
        return max(0.0, self.draining_deadline - time.monotonic())

    def log_failure(self, job: _Job, event: Event) -> None:
        logger.error("A %s request for model '%s' failed while generating: %s", job.kind, job.body.model,
                     event.error)

    def count_tokens(self, prompts: list[list[int]], completion_tokens: int) -> None:
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        self.metrics.completion_tokens.inc(completion_tokens)

    # ---- embeddings --------------------------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest) -> dict:
        served = self.pick(body.model)
        width = self.engine.model.config.n_embd
        if body.dimensions is not None and body.dimensions != width:
            raise APIError(400, f"this model's embeddings have {width} dimensions; 'dimensions' cannot change "
                           "that", param="dimensions")
        inputs = self.prompt_ids(body.input, "input")
        for ids in inputs:
            self.check_length(ids, "input", reply=False)
        try:
            vectors = await asyncio.wrap_future(self.engine.embed(inputs, served.adapter))
        except EngineStopped as exc:
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        vectors = vectors.numpy().astype(np.float32)
        broken = np.flatnonzero(~np.isfinite(vectors).all(axis=1)).tolist()
        if broken:  # a broken model or adapter: JSON cannot carry NaN, and base64 would hide it
            logger.error("Embeddings of model '%s' are not finite for input(s) %s", body.model, broken)
            raise APIError(500, f"the model produced non-finite embeddings for input(s) {broken}", type="server_error",
                           code="generation_failed")
        data = []
        for i, vector in enumerate(vectors):
            value = (base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                     if body.encoding_format == "base64" else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(ids) for ids in inputs)
        self.metrics.prompt_tokens.inc(tokens)
        return {"object": "list", "data": data, "model": body.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---- prompts -------------------------------------------------------------------------------------------------

    def check_length(self, ids: list[int], param: str, reply: bool = True) -> None:
        """A prompt must leave room for at least one generated token (`reply`); an embedding input must fit."""
        limit = self.engine.max_context
        if len(ids) > limit - reply:
            room = " (at least one must be left for the reply)" if reply else ""
            raise APIError(400, f"This model's maximum context length is {limit} tokens, but the {param} has "
                           f"{len(ids)} tokens{room}. Shorten it.", param=param, code="context_length_exceeded")

    def prompt_ids(self, prompt, param: str) -> list[list[int]]:
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
                ids = self.tokenizer.encode(p, add_bos=True)
                if not ids:  # an empty text, and a tokenizer without a bos token
                    raise APIError(400, f"'{param}' holds an empty text", param=param)
            else:
                if not p:
                    raise APIError(400, f"'{param}' holds an empty token list", param=param)
                bad = [t for t in p if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(400, f"token id {bad[0]} in '{param}' is outside this model's vocabulary "
                                   f"(0..{self.vocab_size - 1})", param=param)
                ids = list(p)
            result.append(ids)
        return result


class _Stream(StreamingResponse):
    """An SSE response that cancels its sequences when it ends for any reason (client gone included)."""

    def __init__(self, body, sequences: list[Sequence], metrics: Metrics):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.sequences, self.metrics = sequences, metrics

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.metrics.cancelled.inc(cancel_all(self.sequences))


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so the next message is the disconnect)."""
    with contextlib.suppress(Exception):
        while (await request.receive())["type"] != "http.disconnect":
            pass


def usage(prompts: list[list[int]], completion_tokens: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def completion_logprobs(entries, start_offset: int) -> dict:
    offsets, offset = [], start_offset
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}


def chat_logprobs(entries) -> dict:
    def item(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}
