"""Turning OpenAI requests into engine work and engine events into OpenAI responses (vLLM's "serving" layer).

`OpenAIServing` holds the engine and the table of served models. Each endpoint family has one method that
validates what the protocol models cannot (model name, prompt lengths, content parts), submits every sequence of
the request to the engine at once (all or none), and answers either as one JSON body or as server-sent events.

A request is one unit: when one of its sequences fails, or the client goes away (streaming or not, waiting in the
queue or running), all of its sequences are cancelled. A failed sequence answers 500 in OpenAI's error format (a
stream ends with an error event, then [DONE]); the engine goes on serving everyone else.

While the server drains (SIGTERM, `start_draining`), requests in flight go on until the drain deadline; then a
stream ends with an error event and [DONE], and a request that is not streamed answers 503.

Vision (a checkpoint whose tokenizer has an image tokenizer): chat image_url parts are decoded (size caps checked
from the header first), fit to the image tokenizer and encoded as image spans, in a worker thread, so the event loop
keeps serving. An assistant's text may carry images as markdown data URLs (what this server answers with), and
they go back in as images. A reply's image span becomes `![image](data:image/png;base64,...)` in its text the
moment its end marker is sampled (streamed or not). POST /v1/images/generations draws with the chat format: the
user turn is the prompt, the reply is forced to open an image span (with the asked size's header, if any), sampled
with classifier-free guidance against the same turn with empty text (`guidance_scale`, 1 = off).

Audio (a checkpoint whose tokenizer has an audio tokenizer): chat input_audio parts ({"data": base64, "format": "wav"
| "flac" | "mp3" | "ogg"}, caps from `AudioLimits`: bytes checked from the base64 length, the format against the
bytes, the duration from the header, all before decoding) are decoded to mono at the codec's rate and encoded as
audio spans in the worker thread too. A reply's audio spans are answered the way OpenAI's audio-output chat answers:
`message.content` is the reply's text without the spans (never null), and `message.audio` = {"id", "data": base64,
"expires_at", "transcript"} holds every span of the reply, joined in order, as one WAV file (or raw 16-bit PCM at
the codec's rate for `audio: {"format": "pcm16"}`); `transcript` is the reply's text (the model writes no separate
transcript of its speech). A stream sends each span as `delta.audio` {"id", "data", "expires_at"} the moment its end
marker is sampled, in the same format (pcm16 pieces join into the whole reply; each wav piece is a whole file),
while text deltas carry the text only. This server keeps no audio: `expires_at` is the reply's own time, and an
assistant message sent back carries its audio in `audio.data` (as answered, wav) or as input_audio parts.
POST /v1/audio/transcriptions answers with the transcribe task's chat format (user: [audio, "Transcribe the
audio."]; `prompt` replaces the instruction), greedy unless `temperature` is given; POST /v1/audio/speech with the
speak task's (user: "Say: TEXT"), its reply forced to open an audio span; a reply that ends without a complete span
is a 422, as for drawings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import math
import threading
import time
import uuid
import weakref
import zlib
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..data.audio import AUDIO_FORMATS, MAX_AUDIO_BYTES, MAX_AUDIO_SECONDS, decode_audio_bytes, encode_pcm16, encode_wav
from ..data.images import decode_image_bytes, encode_png
from ..data.speech import PROMPTS, speak_prompt
from ..data.vision import fit_image, unconditional_prompt
from ..device import release_openmp_threads
from ..errors import DataError, GenerationError, TokenizerError
from ..infer.engine import Engine, EngineStopped, Event, Sequence
from ..modalities import MODALITIES
from ..modalities.stream import MAX_GRID, has_modality, messages_media
from .metrics import Metrics
from .protocol import (CLIENT_CLOSED, APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                       ImageGenerationRequest, SpeechRequest, TranscriptionRequest, audio_data_bytes, image_url_bytes)

logger = logging.getLogger("uvicorn.error")  # the server's error log (uvicorn's handler, level and repeat filter)


@dataclass
class ServedModel:
    name: str
    adapter: int  # 0 = the base
    info: dict


@dataclass(frozen=True)
class ImageLimits:
    """What one request may send as images (serve's --max-image-bytes, --max-image-pixels, --max-images)."""
    max_bytes: int = 4 << 20  # encoded bytes of one image (the request body's own limit is --max-body-bytes)
    max_pixels: int = 4096 * 4096  # width x height of one image, read from its header before it is decoded
    max_images: int = 8  # images in one chat request (every message together)


@dataclass(frozen=True)
class AudioLimits:
    """What one request may send as audio (serve's --max-audio-bytes, --max-audio-seconds, --max-audios)."""
    max_bytes: int = MAX_AUDIO_BYTES  # encoded bytes of one clip (the request body's own limit comes first)
    max_seconds: float = MAX_AUDIO_SECONDS  # one clip's duration, read from its header before it is decoded
    max_audios: int = 8  # clips in one chat request (every message together)


@dataclass(frozen=True)
class ImageInput:
    """An image of a chat request, not yet decoded: its data URL and the request field it came from."""
    url: str
    param: str


@dataclass(frozen=True)
class AudioInput:
    """A clip of a request, not yet decoded: its bytes (base64 for a chat part), its declared format (None: any
    AUDIO_FORMATS container) and the request field it came from."""
    data: str | bytes
    format: str | None
    param: str


# An image in an assistant's text, as this server writes it: ![alt](data:image/...;base64,...)
# (bounded repeats: a text of many "![" must not take quadratic time)
MARKDOWN_IMAGE = re.compile(r"!\[[^\]\n]{0,200}\]\((data:image/[a-zA-Z.+-]{1,40};base64,[A-Za-z0-9+/=\s]*)\)")


def image_markdown(png: bytes) -> str:
    return f"![image](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


class ClientDisconnected(Exception):
    """The client went away before its answer was complete."""


class DrainDeadline(Exception):
    """The server is shutting down and the drain deadline has passed."""


# The loop takes the engine's events at most this often (seconds; `fmforge serve --stream-interval` in ms). A token
# waits at most this long before it is written. 16 streams of 200 tokens through the server, the bf16 compiled
# engine, servers alternating wave by wave, 8 waves each, 2 threads: on an AMD EPYC (2026-12-06) 5 ms 2,632
# tokens/s against 2,206 for a wake-up per decode step; on an Intel Xeon with AMX, where the step is ~1.5 ms
# (2026-12-07), 5 ms 5,537, 10 ms 6,270, 15 ms 6,378-6,524 (faster than 5 ms in 8 of 8 waves), 25 ms 6,871: each
# wake-up of the loop (and of the clients it writes to) takes a core from the engine's two threads.
WAKE_INTERVAL = 0.020


class _Inbox:
    """Engine events on their way to the event loop: the engine's thread appends, and the loop is woken once for
    all that arrived since it last looked, and at most once every `interval` seconds: under load each stream then
    finds several tokens at a wake-up and writes them as one chunk of events (stream), and the engine's thread
    hands the interpreter lock to the loop less often."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = WAKE_INTERVAL):
        self.loop, self.lock, self.interval = loop, threading.Lock(), interval
        self.items: deque = deque()
        self.woken = False  # a flush is scheduled on the loop
        self.flushed = 0.0  # loop.time() of the last flush

    def put(self, queue: asyncio.Queue, item) -> None:
        """From any thread. Raises RuntimeError when the loop is closed (the engine then cancels the sequence)."""
        if self.loop.is_closed():  # (a flush may be pending on it: then nothing below would find out)
            raise RuntimeError("the event loop is closed")
        with self.lock:
            self.items.append((queue, item))
            if self.woken:
                return
            self.woken = True
        try:
            self.loop.call_soon_threadsafe(self.wake)
        except RuntimeError:
            with self.lock:
                self.woken = False
            raise

    def wake(self) -> None:
        """On the loop: flush now, or when `interval` has passed since the last flush."""
        wait = self.flushed + self.interval - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self.flush)
        else:
            self.flush()

    def flush(self) -> None:
        self.flushed = self.loop.time()
        with self.lock:
            items, self.items, self.woken = self.items, deque(), False
        for queue, item in items:
            queue.put_nowait(item)


async def off_loop(work, *args):
    """`work(*args)` in a worker thread, so that the event loop keeps serving. The media codecs run torch there, so
    the worker's OpenMP threads go after it: they would slow the engine's (device.release_openmp_threads)."""
    def run():
        try:
            return work(*args)
        finally:
            release_openmp_threads()
    return await asyncio.to_thread(run)


_INBOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its _Inbox


def inbox(loop: asyncio.AbstractEventLoop, interval: float = WAKE_INTERVAL) -> _Inbox:
    """The loop's inbox (made at the first call; `interval` is the wake interval it is made with)."""
    if loop not in _INBOXES:
        _INBOXES[loop] = _Inbox(loop, interval)
    return _INBOXES[loop]


@dataclass
class _Job:
    """The sequences of one request and the queue their events arrive on (index = prompt x n + choice)."""
    kind: str  # "chat" | "completion" | "image" | "speech" | "transcription"
    body: ChatCompletionRequest | CompletionRequest | ImageGenerationRequest | SpeechRequest | TranscriptionRequest
    prompts: list[list[int]]
    sequences: list[Sequence]
    events: asyncio.Queue
    logprobs: int | None

    @property
    def header(self) -> dict:
        return {"id": ("chatcmpl-" if self.kind == "chat" else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": int(time.time()), "model": self.body.model}


@dataclass
class _Output:
    """What one sequence of a job produced: its text pieces, logprobs, token ids and how it ended."""
    pieces: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    waves: list[np.ndarray] = field(default_factory=list)  # a chat reply's audio spans, decoded


class _Reply:
    """A chat choice of a multimodal model as it grows: the engine's text without the span markers' own text, each
    image span as markdown once its end marker arrives, each audio span as nothing (its audio goes beside the
    text). Text that could be the start of a marker is held back (a stop string can make the engine hand a marker's
    text over in two pieces)."""

    def __init__(self, modalities: tuple[str, ...] = tuple(MODALITIES)):
        kinds = [MODALITIES[name] for name in modalities]
        self.end_ids = {kind.begin_id: kind.end_id for kind in kinds}
        self.markers = [marker for kind in kinds for marker in (kind.begin_token, kind.end_token)]
        self.image_end = MODALITIES["image"].end_token if "image" in modalities else None
        self.span: list[int] | None = None  # the ids of the span being written
        self.images: list[str] = []  # markdown of finished image spans whose end marker text has not been fed yet
        self.pending = ""

    def track(self, token_id: int | None) -> list[int] | None:
        """Follow the span grammar; the whole span's ids when `token_id` ends one (span[0] says its modality)."""
        if token_id in self.end_ids:
            self.span = [token_id]
        elif self.span is not None and token_id is not None:
            self.span.append(token_id)
            if token_id == self.end_ids[self.span[0]]:
                span, self.span = self.span, None
                return span
        return None

    def feed(self, text: str, final: bool) -> str:
        """The text to show for the engine's next piece (everything, at the end)."""
        self.pending += text
        out = []
        while True:
            found = [(at, marker) for marker in self.markers if (at := self.pending.find(marker)) != -1]
            if not found:
                break
            at, marker = min(found)
            out.append(self.pending[:at])
            if marker == self.image_end and self.images:
                out.append(self.images.pop(0))
            self.pending = self.pending[at + len(marker):]
        keep = 0
        if not final:  # the longest tail that could grow into a marker
            keep = max((k for marker in self.markers for k in range(1, len(marker))
                        if self.pending.endswith(marker[:k])), default=0)
        out.append(self.pending[:len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep:]
        return "".join(out)


def cancel_all(sequences: list[Sequence]) -> int:
    """Cancel the unfinished sequences; how many there were."""
    stopped = 0
    for sequence in sequences:
        if not sequence.finished and not sequence.cancelled:
            sequence.cancel()
            stopped += 1
    return stopped


class OpenAIServing:
    def __init__(self, engine: Engine, models: dict[str, ServedModel], metrics: Metrics,
                 image_limits: ImageLimits | None = None, audio_limits: AudioLimits | None = None,
                 stream_interval: float = WAKE_INTERVAL):
        self.engine, self.models, self.metrics = engine, models, metrics
        self.stream_interval = stream_interval  # seconds a token may wait to be written with those after it
        self.tokenizer = engine.tokenizer
        self.sees_images = has_modality(self.tokenizer, "image")
        self.hears_audio = has_modality(self.tokenizer, "audio")
        self.media = tuple(name for name in MODALITIES if has_modality(self.tokenizer, name))
        self.image_limits = image_limits or ImageLimits()
        self.audio_limits = audio_limits or AudioLimits()
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

    def pick_generator(self, name: str) -> ServedModel:
        """`pick`, for a request that generates text: an encoder (model.objective mlm) only embeds."""
        served = self.pick(name)
        if not self.engine.model.config.causal:
            raise APIError(400, f"the model '{name}' is an encoder: it serves /v1/embeddings and cannot generate text",
                           param="model", code="model_not_supported")
        return served

    def list_models(self) -> dict:
        """The served models: chat specialists (task sft) first, since the chat page, like most chat clients, opens
        on the first model listed; then the base and the other specialists, in the order they were given."""
        base = next(iter(self.models))
        listed = sorted(self.models.values(), key=lambda m: m.info.get("task") != "sft")  # stable
        data = [{"id": m.name, "object": "model", "created": self.created, "owned_by": "fmforge",
                 "root": base, "parent": None if m.adapter == 0 else base, "max_model_len": self.engine.max_context,
                 **({"task": m.info.get("task")} if m.info.get("task") else {})} for m in listed]
        return {"object": "list", "data": data}

    def get_model(self, name: str) -> dict:
        served = self.pick(name)
        return {"id": served.name, "object": "model", "created": self.created, "owned_by": "fmforge"}

    # ---- completions and chat ---------------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        served = self.pick_generator(body.model)
        prompts = self.prompt_ids(body.prompt, "prompt")
        for ids in prompts:
            self.check_length(ids, "prompt")
        job = self.submit("completion", body, prompts, served.adapter, frozenset({self.tokenizer.eos_id}),
                          body.max_tokens, body.logprobs)
        return await self.respond(job, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        served = self.pick_generator(body.model)
        messages, media = self.chat_messages(body)
        if "audio" in (body.modalities or []) and not self.hears_audio:
            raise APIError(400, f"the model '{body.model}' cannot answer with audio: it has no audio tokenizer",
                           param="modalities", code="unsupported_model")
        arrays = []
        if media:  # decoding and encoding images and audio is CPU work: off the event loop
            def decode_and_encode():
                decoded = self.with_media(messages)
                # what an adapter's understanding encoders read: the users' media (specialists train on those only)
                return self.encode_chat(decoded), messages_media([m for m in decoded if m.get("role") == "user"])

            ids, arrays = await off_loop(decode_and_encode)
        else:
            ids = self.encode_chat(messages)
        self.check_length(ids, "messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = self.submit("chat", body, [ids], served.adapter, self.chat_stops,
                          body.max_completion_tokens or body.max_tokens, logprobs, media=arrays)
        return await self.respond(job, request)

    def chat_messages(self, body: ChatCompletionRequest) -> tuple[list[dict], int]:
        """The messages as encode_chat takes them (content: a string, or a list of strings, ImageInput and
        AudioInput, which `with_media` decodes), and how many images and clips they hold. APIError 400 naming the
        part for a part this model cannot read, or too many images or clips."""
        messages, images, clips = [], 0, 0
        for i, m in enumerate(body.messages):
            parts: list = [m.content] if isinstance(m.content, str) else []
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                parts.append(self.content_part(body.model, part, f"messages.{i}.content.{j}"))
            if self.sees_images and m.role == "assistant":  # images this server answered with, sent back
                parts = [piece for part in parts for piece in
                         (_markdown_images(part, f"messages.{i}.content") if isinstance(part, str) else [part])]
            if m.audio is not None:
                parts.append(self.assistant_audio(body.model, m.role, m.audio, f"messages.{i}.audio"))
            elif m.content is None:
                raise APIError(422, "a message's content may be null (or missing) only beside an assistant's audio",
                               param=f"messages.{i}.content")
            images += sum(isinstance(part, ImageInput) for part in parts)
            clips += sum(isinstance(part, AudioInput) for part in parts)
            if all(isinstance(part, str) for part in parts):
                parts = "".join(parts)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": parts})
        if images > self.image_limits.max_images:
            raise APIError(400, f"this request holds {images} images; this server takes at most "
                           f"{self.image_limits.max_images} per request (--max-images)", param="messages",
                           code="too_many_images")
        if clips > self.audio_limits.max_audios:
            raise APIError(400, f"this request holds {clips} audio clips; this server takes at most "
                           f"{self.audio_limits.max_audios} per request (--max-audios)", param="messages",
                           code="too_many_audio_clips")
        return messages, images + clips

    def content_part(self, model: str, part, where: str):
        """A chat content part as text, ImageInput or AudioInput; APIError 400 naming it if this model cannot read
        it or it lacks its field."""
        kinds = {"image_url": ("image", "images"), "input_audio": ("audio", "audio")}
        if part.type == "text":
            if part.text is None:
                raise APIError(400, "a text content part needs 'text'", param=f"{where}.text")
            return part.text
        if part.type not in kinds:
            raise APIError(400, f"content parts of type '{part.type}' are not supported by this model (it reads "
                           f"{self.reads()})", param=f"{where}.type", code="unsupported_content_type")
        modality, plural = kinds[part.type]
        if modality not in self.media:
            raise APIError(400, f"the model '{model}' does not accept {plural} (content parts of type "
                           f"'{part.type}'): it reads {self.reads()}", param=f"{where}.type",
                           code="unsupported_content_type")
        if part.type == "image_url":
            if part.image_url is None:
                raise APIError(400, "an image_url content part needs 'image_url': {'url': ...}",
                               param=f"{where}.image_url")
            return ImageInput(part.image_url.url, f"{where}.image_url.url")
        if part.input_audio is None:
            raise APIError(400, "an input_audio content part needs 'input_audio': {'data': BASE64, 'format': "
                           "'wav'}", param=f"{where}.input_audio")
        return AudioInput(part.input_audio.data, self.audio_format(part.input_audio.format,
                                                                   f"{where}.input_audio.format"),
                          f"{where}.input_audio.data")

    def assistant_audio(self, model: str, role: str, audio, where: str) -> AudioInput:
        """An assistant message's `audio` (as this server answered it) as the reply's audio, after its text."""
        if role != "assistant":
            raise APIError(400, "only an assistant message carries 'audio' (send a user's audio as an input_audio "
                           "content part)", param=where)
        if not self.hears_audio:
            raise APIError(400, f"the model '{model}' does not accept audio: it reads {self.reads()}", param=where,
                           code="unsupported_content_type")
        if audio.data is None:
            raise APIError(400, "this server keeps no audio between requests: send the reply's audio back with its "
                           "'data' (as answered), or as an input_audio content part", param=f"{where}.data")
        return AudioInput(audio.data, "wav", f"{where}.data")

    def reads(self) -> str:
        return {(): "text only", ("image",): "text and images", ("audio",): "text and audio",
                ("image", "audio"): "text, images and audio"}[self.media]

    @staticmethod
    def audio_format(format: str, param: str) -> str:
        if format.lower() not in AUDIO_FORMATS:
            raise APIError(400, f"audio format {format[:20]!r} is not supported; use one of "
                           f"{', '.join(AUDIO_FORMATS)}", param=param, code="unsupported_audio_format")
        return format.lower()

    def with_media(self, messages: list[dict]) -> list[dict]:
        """The messages with every ImageInput and AudioInput decoded (caps checked before decoding): images fit to
        the image tokenizer, {"type": "image", "image": (H, W, 3) uint8}; audio at the codec's rate, {"type":
        "audio", "audio": (samples,) float32}. Runs in a worker thread."""
        limits = self.image_limits

        def decoded(part):
            if isinstance(part, AudioInput):
                return {"type": "audio", "audio": self.decode_audio(part)}
            if not isinstance(part, ImageInput):
                return part
            data = image_url_bytes(part.url, part.param, limits.max_bytes)
            try:
                pixels = decode_image_bytes(data, where=part.param, max_bytes=limits.max_bytes,
                                            max_pixels=limits.max_pixels)
                return {"type": "image", "image": fit_image(pixels, self.tokenizer)}
            except DataError as exc:
                raise APIError(400, str(exc), param=part.param, code="invalid_image") from None

        return [{**m, "content": [decoded(part) for part in m["content"]]} if isinstance(m["content"], list) else m
                for m in messages]

    def decode_audio(self, clip: AudioInput) -> np.ndarray:
        """A clip as (samples,) float32 mono at the codec's rate: at most --max-audio-bytes and --max-audio-seconds
        (and what one audio span holds), checked before decoding. APIError 400 naming its field otherwise."""
        limits, codec = self.audio_limits, self.tokenizer.codecs["audio"].config
        data = clip.data if isinstance(clip.data, bytes) else audio_data_bytes(clip.data, clip.param, limits.max_bytes)
        if len(data) > limits.max_bytes:  # an upload
            raise APIError(400, f"the audio is {len(data):,} bytes, over this server's {limits.max_bytes:,}-byte limit "
                           "(--max-audio-bytes)", param=clip.param, code="audio_too_large")
        try:
            return decode_audio_bytes(data, codec.sample_rate, where=clip.param, format=clip.format,
                                      max_bytes=limits.max_bytes,
                                      max_seconds=min(limits.max_seconds, codec.max_seconds))  # what a span holds
        except DataError as exc:
            too_long = "second limit" in str(exc)
            raise APIError(400, str(exc), param=clip.param, code="audio_too_long" if too_long else "invalid_audio"
                           ) from None

    def encode_chat(self, messages: list[dict], param: str = "messages") -> list[int]:
        """The conversation's ids, ready for the assistant's reply; APIError 400 naming `param` if the chat
        template cannot take it."""
        try:
            return self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except (TokenizerError, DataError) as exc:
            raise APIError(400, f"'{param}' does not fit this model's chat template: {exc}", param=param) from None

    def submit(self, kind: str, body, prompts: list[list[int]], adapter: int, stop_ids: frozenset[int],
               max_tokens: int | None, logprobs: int | None, unconditional: list[int] | None = None,
               media: list | None = None) -> _Job:
        """Submit n sequences per prompt, all or none: a request the server can never hold is a 400, one that does
        not fit now (free slots + free places in the queue) a 429. `unconditional`: the prompt without its condition,
        for classifier-free guidance; `media`: the prompts' media arrays (an adapter's understanding encoders)."""
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
        mail = inbox(asyncio.get_running_loop(), self.stream_interval)
        events: asyncio.Queue = asyncio.Queue()
        sequences: list[Sequence] = []
        try:
            for p, ids in enumerate(prompts):
                for j in range(body.n):
                    def deliver(event: Event, index=p * body.n + j):
                        mail.put(events, (index, event))

                    sequences.append(engine.submit(ids, params[p], deliver, adapter, stop_ids, seed_offset=j,
                                                   bounded=False, unconditional_ids=unconditional, media=media))
        except EngineStopped as exc:
            cancel_all(sequences)
            raise APIError(503, str(exc), type="server_error", code="unavailable") from None
        except GenerationError as exc:
            cancel_all(sequences)
            raise APIError(400, str(exc)) from None
        return _Job(kind, body, prompts, sequences, events, logprobs)

    async def respond(self, job: _Job, request: Request, answer=None) -> Response:
        """Stream the job, or wait for it whole and answer with `answer(job, outputs)` (default: `collect`)."""
        if job.kind in ("chat", "completion") and job.body.stream:
            return _Stream(self.stream(job), job.sequences, self.metrics)
        watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            outputs = await self.gather(job, watcher)
            return await (answer or self.collect)(job, outputs)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        finally:
            watcher.cancel()
            self.metrics.cancelled.inc(cancel_all(job.sequences))

    async def gather(self, job: _Job, watcher: asyncio.Future) -> list[_Output]:
        """Every sequence of the job to its end. APIError 503 at the drain deadline, 500 if a sequence failed."""
        outputs = [_Output() for _ in job.sequences]
        replies = self.replies(job)
        done = 0
        while done < len(outputs):
            try:
                index, event = await self.next_event(job, watcher)
            except DrainDeadline:
                raise APIError(503, "the server is shutting down and stopped this request at its drain deadline",
                               type="server_error", code="drain_timeout") from None
            if event.finish_reason == "error":
                self.log_failure(job, event)
                raise APIError(500, f"generation failed: {event.error}", type="server_error", code="generation_failed")
            output = outputs[index]
            text, wave = await self.piece(replies, index, event)
            output.pieces.append(text)
            if wave is not None:
                output.waves.append(wave)
            if event.token_id is not None:
                output.token_ids.append(event.token_id)
            if event.logprob is not None:
                output.logprobs.append(event.logprob)
            output.completion_tokens = event.completion_tokens
            if event.finish_reason:
                output.finish_reason, done = event.finish_reason, done + 1
        self.count_tokens(job.prompts, sum(o.completion_tokens for o in outputs))
        return outputs

    def replies(self, job: _Job) -> list[_Reply] | None:
        """A _Reply per choice when a chat reply may hold media spans, else None (the engine's text as it is)."""
        return [_Reply(self.media) for _ in job.sequences] if self.media and job.kind == "chat" else None

    async def piece(self, replies: list[_Reply] | None, index: int, event: Event) -> tuple[str, np.ndarray | None]:
        """The text to show for an event (the engine's text, or for a multimodal model's chat, with images
        rendered and audio spans left out), and the audio of the span the event ends, if it ends one."""
        if replies is None:
            return event.text, None
        reply, wave = replies[index], None
        span = reply.track(event.token_id)
        if span is not None and span[0] == MODALITIES["image"].begin_id:
            reply.images.append(await off_loop(self.span_markdown, span))
        elif span is not None:
            wave = await off_loop(self.span_audio, span)
        return reply.feed(event.text, final=event.finish_reason is not None), wave

    def span_markdown(self, span: list[int]) -> str:
        """A complete image span as a markdown image (a PNG data URL); "" if it does not decode."""
        try:
            return image_markdown(encode_png(self.tokenizer.decode_images(span)[0]))
        except (DataError, IndexError) as exc:  # the sampler's grammar makes every span decode; never hide a reply
            logger.error("An image span of %d ids did not decode: %s", len(span), exc)
            return ""

    def span_audio(self, span: list[int]) -> np.ndarray | None:
        """A complete audio span as a waveform at the codec's rate; None if it does not decode."""
        try:
            return self.tokenizer.decode_audio(span)[0]
        except (DataError, IndexError) as exc:  # as for images: logged, and the reply goes on without it
            logger.error("An audio span of %d ids did not decode: %s", len(span), exc)
            return None

    def audio_message(self, waves: list[np.ndarray], transcript: str | None, format: str,
                      audio_id: str | None = None) -> dict:
        """OpenAI's `message.audio` (or, without a transcript, a stream's `delta.audio`): the waves joined, as a
        base64 WAV file or raw 16-bit PCM at the codec's rate."""
        wave = np.concatenate(waves)
        rate = self.tokenizer.codecs["audio"].config.sample_rate
        data = encode_pcm16(wave) if format == "pcm16" else encode_wav(wave, rate)
        audio = {"id": audio_id or "audio_" + uuid.uuid4().hex, "data": base64.b64encode(data).decode("ascii"),
                 "expires_at": int(time.time())}
        return audio if transcript is None else {**audio, "transcript": transcript}

    async def collect(self, job: _Job, outputs: list[_Output]) -> JSONResponse:
        choices = []
        for i, output in enumerate(outputs):
            text = "".join(output.pieces)
            if job.kind == "chat":
                message = {"role": "assistant", "content": text}
                if output.waves:
                    message["audio"] = self.audio_message(output.waves, text, self.audio_format_of(job.body))
                choices.append({"index": i, "message": message,
                                "logprobs": chat_logprobs(output.logprobs) if job.logprobs is not None else None,
                                "finish_reason": output.finish_reason})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": completion_logprobs(output.logprobs, 0) if job.logprobs is not None
                                else None, "finish_reason": output.finish_reason})
        completion_tokens = sum(o.completion_tokens for o in outputs)
        return JSONResponse({**job.header, "choices": choices, "usage": usage(job.prompts, completion_tokens)})

    async def stream(self, job: _Job):
        """Server-sent events: an event per piece of text, then usage if asked for, then [DONE]. The events of all
        the pieces already waiting go out together, one write for several tokens when the loop falls behind."""
        head = {**job.header, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion"}
        total = len(job.sequences)
        include_usage = bool((job.body.stream_options or {}).get("include_usage"))
        counts, offsets, done = [0] * total, [0] * total, 0
        replies = self.replies(job)
        audio_ids = ["audio_" + uuid.uuid4().hex for _ in range(total)]  # one per choice, as OpenAI streams it
        if job.kind == "chat":
            for i in range(total):
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
        pending: list[str] = []  # events not yet written
        while done < total:
            if pending and job.events.empty():
                yield "".join(pending)
                pending = []
            try:
                index, event = await self.next_event(job)
            except DrainDeadline:
                yield "".join(pending) + sse(APIError(
                    503, "the server is shutting down and stopped this stream at its drain deadline",
                    type="server_error", code="drain_timeout").body()) + "data: [DONE]\n\n"
                return
            if event.finish_reason == "error":
                self.log_failure(job, event)
                yield "".join(pending) + sse(APIError(500, f"generation failed: {event.error}", type="server_error",
                                                      code="generation_failed").body()) + "data: [DONE]\n\n"
                return
            counts[index] = event.completion_tokens
            if event.finish_reason:
                done += 1
            text, wave = await self.piece(replies, index, event)
            if not text and wave is None and event.finish_reason is None and event.logprob is None:
                continue
            entries = [event.logprob] if event.logprob is not None else []
            if job.kind == "chat":
                delta = {"content": text} if text or event.finish_reason is None else {}
                if wave is not None:
                    delta["audio"] = self.audio_message([wave], None, self.audio_format_of(job.body), audio_ids[index])
                choice = {"index": index, "delta": delta,
                          "logprobs": chat_logprobs(entries) if job.logprobs is not None else None,
                          "finish_reason": event.finish_reason}
            else:
                choice = {"index": index, "text": text,
                          "logprobs": completion_logprobs(entries, offsets[index]) if job.logprobs is not None
                          else None, "finish_reason": event.finish_reason}
                offsets[index] += len(text)
            pending.append(sse({**head, "choices": [choice]}))
        self.count_tokens(job.prompts, sum(counts))
        if include_usage:
            pending.append(sse({**head, "choices": [], "usage": usage(job.prompts, sum(counts))}))
        yield "".join(pending) + "data: [DONE]\n\n"

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

    @staticmethod
    def audio_format_of(body: ChatCompletionRequest) -> str:
        return body.audio.format if body.audio is not None else "wav"

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

    # ---- images -------------------------------------------------------------------------------------------------

    async def images(self, body: ImageGenerationRequest, request: Request) -> Response:
        """POST /v1/images/generations: n drawings of the prompt, each a PNG as base64 (OpenAI's b64_json)."""
        served = self.pick(body.model)
        if not self.sees_images:
            raise APIError(400, f"the model '{body.model}' does not accept images: it has no image tokenizer",
                           param="model", code="unsupported_model")
        grid = self.image_grid(body.size)
        offset = self.tokenizer.code_offset("image")
        image = MODALITIES["image"]
        # The chat format the draw task trains: the user turn is the prompt, and the reply opens an image span.
        forced = [image.begin_id] + ([offset + grid[0], offset + grid[1]] if grid else [])
        prompt = self.encode_chat([{"role": "user", "content": body.prompt}], "prompt") + forced
        self.check_length(prompt, "prompt")
        room = self.engine.max_context - len(prompt)
        if grid:  # the codes, then the end marker
            max_tokens = grid[0] * grid[1] + 1
            if max_tokens > room:
                raise APIError(400, f"This model's maximum context length is {self.engine.max_context} tokens; the "
                               f"prompt has {len(prompt)} tokens and a {body.size} image takes {max_tokens} more. "
                               "Ask for a smaller size or shorten the prompt.", param="size",
                               code="context_length_exceeded")
        else:  # the grid's height and width, then at most MAX_GRID x MAX_GRID codes and the end marker
            max_tokens = min(room, 2 + MAX_GRID * MAX_GRID + 1)
        job = self.submit("image", body, [prompt], served.adapter, self.chat_stops | {image.end_id}, max_tokens,
                          None, unconditional_prompt(self.tokenizer) + forced)

        async def answer(job: _Job, outputs: list[_Output]) -> JSONResponse:
            drawn = await off_loop(self.drawings, forced, outputs)
            missing = [i for i, png in enumerate(drawn) if png is None]
            if missing:
                output = outputs[missing[0]]
                raise APIError(422, f"the model wrote no complete image (drawing {missing[0]}: "
                               f"{output.completion_tokens} tokens, finish_reason {output.finish_reason!r}, the "
                               f"context left room for {max_tokens}); give a 'size' that fits, e.g. "
                               f"'{self.tokenizer.codecs['image'].config.image_size}x"
                               f"{self.tokenizer.codecs['image'].config.image_size}'", param="size",
                               code="no_image_generated")
            output_tokens = sum(o.completion_tokens for o in outputs)
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in drawn]
            return JSONResponse({
                "created": int(time.time()), "data": data, "output_format": "png",
                **({"size": body.size} if grid else {}),
                "usage": {"input_tokens": len(prompt), "output_tokens": output_tokens,
                          "total_tokens": len(prompt) + output_tokens,
                          "input_tokens_details": {"text_tokens": len(prompt) - len(forced),
                                                   "image_tokens": len(forced)}}})

        return await self.respond(job, request, answer)

    def image_grid(self, size: str | None) -> tuple[int, int] | None:
        """(height, width) in codes of a "WIDTHxHEIGHT" size; None for None or "auto" (the model chooses)."""
        if size is None or size == "auto":
            return None
        step = self.tokenizer.codecs["image"].config.downsample
        side = self.tokenizer.codecs["image"].config.image_size
        match = re.fullmatch(r"([0-9]{1,6})x([0-9]{1,6})", size)
        width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
        if not all(value % step == 0 and 1 <= value // step <= MAX_GRID for value in (width, height)):
            raise APIError(400, f"size must be 'WIDTHxHEIGHT' in pixels, each a multiple of {step} from {step} to "
                           f"{step * MAX_GRID} (this model draws {step}x{step}-pixel codes, at most {MAX_GRID} a "
                           f"side), e.g. '{side}x{side}', or 'auto'; got {size[:40]!r}", param="size",
                           code="invalid_value")
        return height // step, width // step

    def drawings(self, forced: list[int], outputs: list[_Output]) -> list[bytes | None]:
        """Each output's first complete image (after the forced start of its span) as PNG bytes, else None."""
        drawn = []
        for output in outputs:
            try:
                images = self.tokenizer.decode_images(forced + output.token_ids)
            except DataError as exc:
                logger.error("A drawn image span did not decode: %s", exc)
                images = []
            drawn.append(encode_png(images[0]) if images else None)
        return drawn

    # ---- audio ----------------------------------------------------------------------------------------------------

    def pick_listener(self, name: str) -> ServedModel:
        """`pick`, for the Audio API: the checkpoint must have an audio tokenizer."""
        served = self.pick_generator(name)
        if not self.hears_audio:
            raise APIError(400, f"the model '{name}' does not accept audio: it has no audio tokenizer", param="model",
                           code="unsupported_model")
        return served

    async def speech(self, body: SpeechRequest, request: Request) -> Response:
        """POST /v1/audio/speech: the input spoken, as WAV bytes or raw 16-bit PCM (X-Sample-Rate says the rate)."""
        served = self.pick_listener(body.model)
        audio = MODALITIES["audio"]
        # The chat format the speak task trains: the user turn is "Say: TEXT", and the reply is an audio span.
        forced = [audio.begin_id]
        prompt = self.encode_chat([{"role": "user", "content": speak_prompt(body.input)}], "input") + forced
        self.check_length(prompt, "input")
        # rows and codes per row, then at most MAX_GRID x MAX_GRID codes and the end marker
        max_tokens = min(self.engine.max_context - len(prompt), 2 + MAX_GRID * MAX_GRID + 1)
        job = self.submit("speech", body, [prompt], served.adapter, self.chat_stops | {audio.end_id}, max_tokens,
                          None)

        async def answer(job: _Job, outputs: list[_Output]) -> Response:
            (output,) = outputs
            wave = await off_loop(self.span_audio, forced + output.token_ids) \
                if output.token_ids and output.token_ids[-1] == audio.end_id else None
            if wave is None:
                raise APIError(422, f"the model spoke no complete audio span ({output.completion_tokens} tokens, "
                               f"finish_reason {output.finish_reason!r}, the context left room for {max_tokens}); "
                               "shorten the input", param="input", code="no_audio_generated")
            rate = self.tokenizer.codecs["audio"].config.sample_rate
            headers = {"X-Sample-Rate": str(rate), "X-Usage-Input-Tokens": str(len(prompt)),
                       "X-Usage-Output-Tokens": str(output.completion_tokens)}
            if body.response_format == "pcm":
                return Response(encode_pcm16(wave), media_type="audio/pcm", headers=headers)
            return Response(encode_wav(wave, rate), media_type="audio/wav", headers=headers)

        return await self.respond(job, request, answer)

    async def transcriptions(self, body: TranscriptionRequest, file: tuple[str, bytes] | None,
                             request: Request) -> Response:
        """POST /v1/audio/transcriptions: the uploaded clip's transcript, as json, text or verbose_json."""
        served = self.pick_listener(body.model)
        if file is None:
            raise APIError(400, "the upload needs a 'file' part holding the audio (wav, flac, mp3 or ogg)",
                           param="file", code="invalid_value")
        clip = AudioInput(file[1], None, "file")
        wave = await off_loop(self.decode_audio, clip)
        rate = self.tokenizer.codecs["audio"].config.sample_rate
        # The chat format the transcribe task trains: the user turn is the audio and the instruction.
        content = [{"type": "audio", "audio": wave}, body.prompt or PROMPTS["transcribe"]]
        prompt = await off_loop(self.encode_chat, [{"role": "user", "content": content}], "file")
        self.check_length(prompt, "file")
        verbose = body.response_format == "verbose_json"
        job = self.submit("transcription", body, [prompt], served.adapter, self.chat_stops, None,
                          0 if verbose else None, media=[wave])

        async def answer(job: _Job, outputs: list[_Output]) -> Response:
            (output,) = outputs
            text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True).strip()
            if body.response_format == "text":
                return Response(text, media_type="text/plain; charset=utf-8")
            if not verbose:
                audio_tokens = sum(end - start for name, start, end in self.tokenizer.spans(prompt) if name == "audio")
                return JSONResponse({"text": text, "usage": {
                    "type": "tokens", "input_tokens": len(prompt), "output_tokens": output.completion_tokens,
                    "total_tokens": len(prompt) + output.completion_tokens,
                    "input_token_details": {"text_tokens": len(prompt) - audio_tokens, "audio_tokens": audio_tokens}}})
            duration = len(wave) / rate
            logprobs = [entry.logprob for entry in output.logprobs]
            encoded = text.encode("utf-8")
            segment = {"id": 0, "seek": 0, "start": 0.0, "end": duration, "text": text, "tokens": output.token_ids,
                       "temperature": body.temperature or 0.0,
                       "avg_logprob": sum(logprobs) / len(logprobs) if logprobs else 0.0,
                       "compression_ratio": len(encoded) / len(zlib.compress(encoded)) if encoded else 0.0}
            return JSONResponse({"task": "transcribe", "language": "english", "duration": duration, "text": text,
                                 "segments": [segment] if text else [],
                                 "usage": {"type": "duration", "seconds": math.ceil(duration)}})

        return await self.respond(job, request, answer)

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


def _markdown_images(text: str, param: str) -> list:
    """Text with its markdown data-URL images as ImageInput parts: [text, ImageInput, text, ...]."""
    parts, start = [], 0
    for match in MARKDOWN_IMAGE.finditer(text):
        parts += [text[start:match.start()], ImageInput(match.group(1), param)]
        start = match.end()
    return [part for part in parts + [text[start:]] if not isinstance(part, str) or part]


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
