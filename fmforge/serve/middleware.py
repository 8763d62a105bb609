"""ASGI middleware in front of every route: the API key, the body size limit, request metrics."""

from __future__ import annotations

import base64
import binascii
import hmac
import time

from fastapi.responses import JSONResponse

from .metrics import Metrics
from .protocol import APIError


class BodyTooLarge(Exception):
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
                return await error_response(error)(scope, receive, send_recording)
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return await error_response(too_large(self.max_body))(scope, receive, send_recording)
            received = 0

            async def receive_limited():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise BodyTooLarge()
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


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)
