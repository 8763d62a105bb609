"""The OpenAI API as fmforge accepts it: request bodies (pydantic, strict where OpenAI is strict), the conversion of
a request into the engine's one `SamplingParams` (`to_sampling_params`, as vLLM does it), and OpenAI's error shape.

Fields OpenAI defines that fmforge does not implement are refused with a clear 400 when set to anything but their
default (`suffix`, `echo`, `best_of` > n, `tools`, `response_format` other than text, ...); fields that only label
a request (`user`, `metadata`) are accepted and ignored. vLLM's extensions `top_k`, `min_p`,
`repetition_penalty` and `stop_token_ids` are accepted too.

Images come in as chat content parts {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}:
`image_url_bytes` takes PNG, JPEG and WebP data URLs only (no URL is ever fetched) and refuses, with a 400 naming
the part, anything else, bad base64, and data over the byte cap, before the image is decoded. The Images API
(`ImageGenerationRequest`) answers b64_json only.

Audio comes in as chat content parts {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}
(wav, flac, mp3 or ogg; `audio_data_bytes` checks the size from the base64 length before decoding it) and as the
Audio API's multipart upload (`TranscriptionRequest`, read by `parse_form`). A chat request may set OpenAI's
`modalities` (["text"], ["text", "audio"]) and `audio` ({"voice", "format": "wav" | "pcm16"}): the format is that of
the reply's audio; `voice` is accepted and ignored (a model speaks with the one voice it learned), as in
`SpeechRequest`, whose response_format is "wav" (the default here) or "pcm".
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import json
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..data.vision import DRAW_GUIDANCE
from ..errors import GenerationError
from ..infer.sampling import MAX_GUIDANCE, SamplingParams

MAX_JSON_DEPTH = 32  # a request body nested deeper is refused (OpenAI's bodies need about 5)
# ASCII digits only (str.isdigit also accepts '²' and '١'), and few of them: int() refuses over 4300 digits.
TOKEN_ID = re.compile(r"-?[0-9]{1,18}")
INT64 = (-(2**63), 2**63 - 1)  # OpenAI's seed is an int64
CLIENT_CLOSED = 499  # nginx's status for "the client closed the request": recorded in metrics, sent to nobody


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body (the OpenAPI schema of every error answer)."""
    error: ErrorDetail


class _Request(BaseModel):
    # strict: `max_tokens: true`, `stream: "yes"` or `"n": "2"` are type errors, as in OpenAI's API
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields: see check_unsupported

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = off
    min_p: float = Field(0.0, ge=0, le=1)  # vLLM's extension
    repetition_penalty: float = Field(1.0, gt=0, le=10)  # vLLM's extension
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def to_sampling_params(self, vocab_size: int, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The request's sampling as the engine's SamplingParams; `max_tokens` is what the request may generate
        (its own limit, or the room left in the context). APIError (400) naming the field for a bad value."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if self.seed is not None and not INT64[0] <= self.seed <= INT64[1]:
            raise APIError(400, f"seed must be a 64-bit signed integer ({INT64[0]} .. {INT64[1]})", param="seed")
        if len(stop) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not TOKEN_ID.fullmatch(key) or not 0 <= int(key) < vocab_size:
                raise APIError(400, f"logit_bias key {key[:24]!r} is not a token id of this model "
                               f"(0..{vocab_size - 1})", param="logit_bias")
            if not math.isfinite(value):
                raise APIError(400, f"logit_bias value for {key} must be a finite number", param="logit_bias")
            bias[int(key)] = max(-100.0, min(100.0, value))
        params = SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(0, self.top_k or 0), top_p=1.0 if self.top_p is None else self.top_p, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, stop=stop,
            stop_token_ids=tuple(self.stop_token_ids or ()), seed=self.seed, logprobs=logprobs)
        try:
            return params.validate(vocab_size)
        except GenerationError as exc:
            field = str(exc).split(" ", 1)[0].split("[", 1)[0]
            raise APIError(400, str(exc), param=field if field in type(self).model_fields else None) from None


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is fit to the image tokenizer


class InputAudio(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    data: str  # base64 of the encoded clip
    format: str  # wav, flac, mp3 or ogg (checked by the server: a 400 naming the part, not a 422)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None


class AssistantAudio(BaseModel):
    """An assistant message's `audio`, as this server answered it: its `data` goes back in as the reply's audio
    (this server keeps no audio, so an `id` alone cannot be looked up)."""
    model_config = ConfigDict(extra="allow", strict=True)

    id: str | None = None
    data: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None  # null only beside an assistant's audio
    name: str | None = None
    audio: AssistantAudio | None = None


class AudioOutput(BaseModel):
    """A chat request's `audio`: the format of the reply's audio; the voice is accepted and ignored."""
    model_config = ConfigDict(extra="allow", strict=True)

    voice: str | dict[str, Any] | None = None
    format: str = "wav"  # "wav" or "pcm16" (checked in check_unsupported: a 400)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    modalities: list[str] | None = None  # "text" and "audio"; the model decides whether a reply speaks
    audio: AudioOutput | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class ImageGenerationRequest(BaseModel):
    """OpenAI's Images API body (POST /v1/images/generations). `size` is "WIDTHxHEIGHT" in pixels, or None/"auto"
    (the model chooses); `seed` and `temperature` are extensions, as in chat, and `guidance_scale` (classifier-free
    guidance; 1 = off, default data.vision.DRAW_GUIDANCE), as in diffusers."""
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=10)
    size: str | None = None
    response_format: str | None = None  # only "b64_json" (checked in check_unsupported: a 400, not a 422)
    output_format: str | None = None  # only "png"
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    guidance_scale: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    user: str | None = None

    def to_sampling_params(self, vocab_size: int, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        """The drawing's sampling: temperature (default 1), seed, guidance; APIError 400 for a bad seed."""
        if self.seed is not None and not INT64[0] <= self.seed <= INT64[1]:
            raise APIError(400, f"seed must be a 64-bit signed integer ({INT64[0]} .. {INT64[1]})", param="seed")
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else
                                self.temperature, seed=self.seed,
                                guidance=DRAW_GUIDANCE if self.guidance_scale is None else self.guidance_scale)
        try:
            return params.validate(vocab_size)
        except GenerationError as exc:
            raise APIError(400, str(exc)) from None


class SpeechRequest(BaseModel):
    """OpenAI's speech body (POST /v1/audio/speech). `voice` is required, as by OpenAI, and ignored; `speed` must be
    1; `seed` and `temperature` are extensions, as in chat."""
    model_config = ConfigDict(extra="allow", strict=True)
    n: ClassVar[int] = 1

    model: str
    input: str = Field(min_length=1, max_length=4096)
    voice: str | dict[str, Any]
    response_format: str = "wav"  # "wav" or "pcm" (checked in check_unsupported: a 400, not a 422)
    speed: float = Field(1.0, ge=0.25, le=4.0)
    instructions: str | None = None
    stream_format: str | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)

    def to_sampling_params(self, vocab_size: int, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        return _seeded_params(self, vocab_size, max_tokens, logprobs)


TRANSCRIPTION_FORMATS = ("json", "text", "verbose_json")


class TranscriptionRequest(BaseModel):
    """The fields of OpenAI's transcription upload (POST /v1/audio/transcriptions, multipart/form-data) besides the
    file. Form fields arrive as text: numbers are parsed (lax), everything else must be the declared type. `prompt`
    replaces the transcribe task's instruction; `seed` is an extension."""
    model_config = ConfigDict(extra="allow")
    n: ClassVar[int] = 1

    model: str
    prompt: str | None = None
    response_format: str = "json"  # json, text or verbose_json (checked in check_unsupported: a 400)
    temperature: float | None = Field(None, ge=0, le=1)
    language: str | None = None
    seed: int | None = None

    def to_sampling_params(self, vocab_size: int, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        return _seeded_params(self, vocab_size, max_tokens, logprobs, default_temperature=0.0)


def _seeded_params(request, vocab_size: int, max_tokens: int, logprobs: int | None,
                   default_temperature: float = 1.0) -> SamplingParams:
    """Sampling of the Audio API's requests: temperature and seed only."""
    if request.seed is not None and not INT64[0] <= request.seed <= INT64[1]:
        raise APIError(400, f"seed must be a 64-bit signed integer ({INT64[0]} .. {INT64[1]})", param="seed")
    params = SamplingParams(max_tokens=max_tokens, temperature=default_temperature if request.temperature is None
                            else request.temperature, seed=request.seed, logprobs=logprobs)
    try:
        return params.validate(vocab_size)
    except GenerationError as exc:
        raise APIError(400, str(exc)) from None


# Data URLs of these media types are accepted, and the bytes must start with one of these formats' signatures.
IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp")


def _is_png_jpeg_or_webp(data: bytes) -> bool:
    return (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


def image_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    """The encoded image in a data URL (`data:image/png;base64,...`; PNG, JPEG or WebP), at most `max_bytes`.
    Anything else (another scheme: no URL is fetched; a malformed URL; bad base64; another media type; bytes that
    are not one of the three formats) is an APIError 400 naming `param`. The pixels are not looked at here."""
    scheme, colon, rest = url.partition(":")
    if not colon or scheme.lower() != "data":
        given = f"an '{scheme.lower()}:' URL" if colon and len(scheme) < 16 else "something else"
        raise APIError(400, f"image_url must be a data URL (data:image/png;base64,...), not {given}: this server "
                       "fetches no URLs", param=param, code="invalid_image_url")
    header, comma, data = rest.partition(",")
    if not comma:
        raise APIError(400, "image_url is a malformed data URL: no ',' between its header and its data",
                       param=param, code="invalid_image_url")
    media_type, *options = (piece.strip().lower() for piece in header.split(";"))
    if "base64" not in options:
        raise APIError(400, "image_url must be a base64 data URL (data:image/png;base64,...)", param=param,
                       code="invalid_image_url")
    if media_type not in IMAGE_MEDIA_TYPES:
        raise APIError(400, f"image_url has media type {media_type[:40] or '(none)'!r}; this server accepts "
                       "image/png, image/jpeg and image/webp", param=param, code="unsupported_image_type")
    if len(data) // 4 * 3 > max_bytes + 3:  # the decoded size, known before decoding
        raise APIError(400, f"the image is about {len(data) // 4 * 3:,} bytes, over this server's {max_bytes:,}-byte "
                       "limit (--max-image-bytes)", param=param, code="image_too_large")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url's data is not valid base64", param=param, code="invalid_image_url") from None
    if len(raw) > max_bytes:
        raise APIError(400, f"the image is {len(raw):,} bytes, over this server's {max_bytes:,}-byte limit "
                       "(--max-image-bytes)", param=param, code="image_too_large")
    if not _is_png_jpeg_or_webp(raw):
        raise APIError(400, f"image_url's data is not a PNG, JPEG or WebP image (it says {media_type})",
                       param=param, code="invalid_image")
    return raw


def audio_data_bytes(data: str, param: str, max_bytes: int) -> bytes:
    """The encoded clip of an input_audio part's base64 `data`, at most `max_bytes` (known from the base64 length
    before decoding). APIError 400 naming `param` for bad base64 or too many bytes; the audio is not looked at."""
    if len(data) // 4 * 3 > max_bytes + 3:
        raise APIError(400, f"the audio is about {len(data) // 4 * 3:,} bytes, over this server's {max_bytes:,}-byte "
                       "limit (--max-audio-bytes)", param=param, code="audio_too_large")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the audio data is not valid base64", param=param, code="invalid_audio") from None
    if len(raw) > max_bytes:
        raise APIError(400, f"the audio is {len(raw):,} bytes, over this server's {max_bytes:,}-byte limit "
                       "(--max-audio-bytes)", param=param, code="audio_too_large")
    return raw


def parse_form(content_type: str, raw: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """A multipart/form-data body -> (text fields, files: name -> (filename, bytes)), read with the standard
    library's MIME parser. A field named twice keeps its last value; names ending in "[]" (OpenAI's list fields)
    are kept as they are. APIError 400 for another content type or a malformed body."""
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type.lower():
        raise APIError(400, "send the upload as multipart/form-data (a 'file' part and the other fields), not "
                       f"{content_type.split(';')[0][:60] or 'a body without a Content-Type'}", code="invalid_form")
    try:
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
        parts = list(message.iter_parts()) if message.is_multipart() else []
    except (ValueError, TypeError, UnicodeError, LookupError) as exc:
        raise APIError(400, f"the multipart body is malformed: {exc}", code="invalid_form") from None
    if not parts or message.defects:
        raise APIError(400, "the multipart body is malformed (no parts, or parts not closed by its boundary)",
                       code="invalid_form")
    fields, files = {}, {}
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise APIError(400, "every part of the multipart body needs Content-Disposition: form-data; name=...",
                           code="invalid_form")
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (str(filename), payload)
            continue
        try:
            fields[name] = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f"the form field '{name[:40]}' is not UTF-8 text", param=name[:40],
                           code="invalid_value") from None
        _check_text(fields[name], name)
    return fields, files


# Fields that would change the answer if honoured, with the value that means "not used".
UNSUPPORTED = {"suffix": None, "echo": False, "tools": None, "functions": None, "tool_choice": None,
               "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None,
               "web_search_options": None}


def check_unsupported(request: BaseModel) -> None:
    values = {**request.model_dump(exclude_unset=True), **(request.model_extra or {})}
    if isinstance(request, ImageGenerationRequest):
        return _check_image_request(values)
    if isinstance(request, SpeechRequest):
        return _check_speech_request(values)
    if isinstance(request, TranscriptionRequest):
        return _check_transcription_request(values)
    if isinstance(request, ChatCompletionRequest):
        _check_audio_output(values)
    for name, default in UNSUPPORTED.items():
        if isinstance(request, ChatCompletionRequest) and name in ("audio", "modalities"):
            continue
        if name in values and values[name] not in (default, None, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    fmt = values.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
    best_of = values.get("best_of")
    if best_of is not None and best_of != values.get("n", 1):
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")


def _check_image_request(values: dict) -> None:
    if values.get("response_format") not in (None, "b64_json"):
        raise APIError(400, "this server returns images as base64 PNG only: set response_format to 'b64_json'",
                       param="response_format", code="unsupported_parameter")
    if values.get("output_format") not in (None, "png"):
        raise APIError(400, "this server returns PNG images only: set output_format to 'png'", param="output_format",
                       code="unsupported_parameter")
    if values.get("stream") not in (None, False):
        raise APIError(400, "streaming partial images is not supported", param="stream", code="unsupported_parameter")
    if values.get("background") not in (None, "auto", "opaque"):
        raise APIError(400, "transparent backgrounds are not supported", param="background",
                       code="unsupported_parameter")


def _check_audio_output(values: dict) -> None:
    modalities = values.get("modalities") or []
    if any(m not in ("text", "audio") for m in modalities):
        raise APIError(400, "modalities may hold 'text' and 'audio'", param="modalities", code="invalid_value")
    fmt = (values.get("audio") or {}).get("format", "wav")
    if fmt not in ("wav", "pcm16"):
        raise APIError(400, f"audio.format {str(fmt)[:20]!r} is not supported: this server answers audio as 'wav' or "
                       "'pcm16'", param="audio.format", code="unsupported_parameter")


SPEECH_FORMATS = ("wav", "pcm")


def _check_speech_request(values: dict) -> None:
    fmt = values.get("response_format", "wav")
    if fmt not in SPEECH_FORMATS:
        raise APIError(400, f"response_format {str(fmt)[:20]!r} is not supported: this server answers speech as "
                       f"{' or '.join(repr(f) for f in SPEECH_FORMATS)} (16-bit PCM at the model's sample rate)",
                       param="response_format", code="unsupported_parameter")
    if values.get("speed", 1.0) != 1.0:
        raise APIError(400, "speed other than 1 is not supported (the model speaks at the pace it learned)",
                       param="speed", code="unsupported_parameter")
    if values.get("instructions"):
        raise APIError(400, "'instructions' is not supported by this server", param="instructions",
                       code="unsupported_parameter")
    if values.get("stream_format") not in (None, "audio"):
        raise APIError(400, "streaming speech as server-sent events is not supported", param="stream_format",
                       code="unsupported_parameter")


def _check_transcription_request(values: dict) -> None:
    fmt = values.get("response_format", "json")
    if fmt not in TRANSCRIPTION_FORMATS:
        raise APIError(400, f"response_format {str(fmt)[:20]!r} is not supported: use "
                       f"{', '.join(repr(f) for f in TRANSCRIPTION_FORMATS)} (this model writes no timestamps, so no "
                       "'srt' or 'vtt')", param="response_format", code="unsupported_parameter")
    if values.get("language") not in (None, "", "en"):
        raise APIError(400, f"language {str(values['language'])[:20]!r} is not supported: the model transcribes "
                       "English ('en')", param="language", code="unsupported_parameter")
    if values.get("timestamp_granularities[]", "segment") != "segment":
        raise APIError(400, "word timestamps are not supported (segment only)", param="timestamp_granularities",
                       code="unsupported_parameter")
    for name in ("stream", "include[]", "chunking_strategy"):
        if values.get(name) not in (None, "", "false"):
            raise APIError(400, f"'{name.rstrip('[]')}' is not supported by this server", param=name.rstrip("[]"),
                           code="unsupported_parameter")


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 422 naming the field."""
    first = errors[0]
    location = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid value")
    return APIError(422, f"{location}: {message}" if location else message, param=location or None,
                    code="invalid_type" if "type" in first.get("type", "") else "invalid_value")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def parse_json_body(raw: bytes) -> dict:
    """A request body as a JSON object: strict JSON (no NaN or Infinity, numbers in range), at most
    MAX_JSON_DEPTH levels deep, every string valid Unicode (no lone surrogates). APIError 400 otherwise."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    check_json_values(body)
    return body


def check_json_values(body: dict) -> None:
    """Walk the parsed body (without recursion): depth limit, and strings (keys too) that are valid Unicode."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels)",
                           code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, path or "body")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, path)


def _check_text(text: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{path}' is not valid Unicode text (it holds a lone UTF-16 surrogate)",
                       param=path, code="invalid_value") from None
