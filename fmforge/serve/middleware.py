"""ASGI middleware in front of every route: the API key, the body size limit and read deadline, request metrics."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import re
import time

from fastapi.responses import JSONResponse

from .metrics import Metrics
from .protocol import CLIENT_CLOSED, APIError

DIGITS = re.compile(r"[0-9]+")


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class Guard:
    """ASGI middleware: API key on every route but /health, body size limit, a deadline for reading the body
    (`body_timeout` seconds from the request head), request metrics by route and status (499 when the client
    went away before its answer: a cancelled request is not a server error)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics,
                 body_timeout: float | None = None):
        self.app, self.api_key, self.max_body, self.metrics = app, api_key, max_body_bytes, metrics
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [None]
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
                return await error_response(error)(scope, receive, send_recording)
            length = headers.get("content-length")
            if length is not None and DIGITS.fullmatch(length) and int(length) > self.max_body:
                return await error_response(too_large(self.max_body))(scope, receive, send_recording)
            received, body_done = 0, False
            deadline = None if self.body_timeout is None else time.monotonic() + self.body_timeout

            async def receive_limited():
                nonlocal received, body_done
                if body_done or deadline is None:
                    message = await receive()  # after the body only the disconnect comes, whenever it does
                else:
                    try:
                        message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise BodyTimeout() from None
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    body_done = not message.get("more_body", False)
                    if received > self.max_body:
                        raise BodyTooLarge()
                return message

            await self.app(scope, receive_limited, send_recording)
        except asyncio.CancelledError:
            status[0] = status[0] or CLIENT_CLOSED  # cancelled (the client left, or the drain deadline passed)
            raise
        finally:
            self.metrics.requests.labels(route, str(status[0] or 500)).inc()
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


def too_large(limit: int) -> APIError:
    # The rest of the body is not read, so the connection cannot carry another request: close it.
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large", headers={"Connection": "close"})


def body_timed_out(seconds: float) -> APIError:
    return APIError(408, f"the request body did not arrive within {seconds:g} seconds", code="request_timeout",
                    headers={"Connection": "close"})


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
