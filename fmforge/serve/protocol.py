"""Request bodies of the OpenAI API as fmforge accepts them (pydantic), and OpenAI's error shape.

Fields OpenAI defines that fmforge does not implement are refused with a clear 400 when set to anything but
their default (`suffix`, `echo`, `best_of` > n, `tools`, `response_format` other than text, ...); fields that
only label a request (`user`, `metadata`) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not know; see check_unsupported

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension; -1 or 0 = off
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ContentPart(BaseModel):
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# Fields that would change the answer if honoured, with the value that means "not used".
UNSUPPORTED = {"suffix": None, "echo": False, "tools": None, "functions": None, "tool_choice": None,
               "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None,
               "web_search_options": None}


def check_unsupported(request: BaseModel) -> None:
    values = {**request.model_dump(exclude_unset=True), **(request.model_extra or {})}
    for name, default in UNSUPPORTED.items():
        if name in values and values[name] not in (default, None, [], {}):
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    fmt = values.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_parameter")
    best_of = values.get("best_of")
    if best_of is not None and best_of != values.get("n", 1):
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 422 naming the field."""
    first = errors[0]
    location = ".".join(str(part) for part in first.get("loc", ()))
    message = first.get("msg", "invalid value")
    return APIError(422, f"{location}: {message}" if location else message, param=location or None,
                    code="invalid_type" if "type" in first.get("type", "") else "invalid_value")
