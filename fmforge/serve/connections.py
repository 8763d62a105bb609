"""Connection hygiene below the ASGI app: a deadline for the request head, a connection limit answered in
OpenAI's error format, malformed HTTP answered in it too, and error logging that cannot flood the disk.

uvicorn bounds an idle keep-alive connection (`timeout_keep_alive`) but not a client that sends its request
head one byte at a time, and its connection limit answers in plain text. `protocol_class` makes a subclass of
uvicorn's h11 protocol that adds both; the body's deadline is the Guard middleware's (it sees the body messages).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

logger = logging.getLogger("uvicorn.error")


def raw_response(error: APIError) -> bytes:
    """An HTTP/1.1 response that closes the connection, for answers written below h11's state machine."""
    body = json.dumps(error.body()).encode()
    phrase = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}.get(error.status, "Error")
    return (f"HTTP/1.1 {error.status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii") + body


def protocol_class(header_timeout: float, max_connections: int | None,
                   on_refused: Callable[[], None] | None = None) -> type[H11Protocol]:
    """uvicorn's h11 protocol, plus: a request head must be whole within `header_timeout` seconds of the
    connection opening (or of the previous response on a kept-alive connection), else 408 and close; a request
    arriving while more than `max_connections` connections are open gets 503 in OpenAI's format."""

    class GuardedProtocol(H11Protocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.head_timer = None
            self.limit_concurrency = None  # uvicorn's own check answers in plain text; ours is below
            if max_connections is not None:
                self.app = self.limited(self.app)

        # ---- the head deadline ----

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm_head_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cancel_head_timer()  # a whole head arrived: the request is being served

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.arm_head_timer()  # the next request's head

        def connection_lost(self, exc) -> None:
            self.cancel_head_timer()
            super().connection_lost(exc)

        def arm_head_timer(self) -> None:
            self.cancel_head_timer()
            self.head_timer = self.loop.call_later(header_timeout, self.head_timed_out)

        def cancel_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_timed_out(self) -> None:
            self.head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a head came
                logger.warning("Closed a connection whose request head was not complete within %gs",
                               header_timeout)
                self.transport.write(raw_response(APIError(
                    408, f"the request head did not arrive within {header_timeout:g} seconds",
                    code="request_timeout")))
            self.transport.close()

        # ---- malformed HTTP and the connection limit, in OpenAI's error format ----

        def send_400_response(self, msg: str) -> None:
            self.transport.write(raw_response(APIError(400, f"{msg} (malformed HTTP/1.1)", code="invalid_http")))
            self.transport.close()

        def limited(self, app):
            async def app_or_refuse(scope, receive, send):
                if scope["type"] == "http" and (len(self.connections) > max_connections
                                                or len(self.tasks) > max_connections):
                    logger.warning("Refused a request: more than %d connections are open", max_connections)
                    if on_refused is not None:
                        on_refused()
                    error = APIError(503, f"the server has more than {max_connections} open connections "
                                     "(--max-connections); retry later", type="server_error",
                                     code="too_many_connections")
                    body = json.dumps(error.body()).encode()
                    await send({"type": "http.response.start", "status": 503, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"), (b"retry-after", b"1")]})
                    await send({"type": "http.response.body", "body": body})
                    return
                await app(scope, receive, send)

            return app_or_refuse

    return GuardedProtocol


class RepeatFilter(logging.Filter):
    """Lets through at most `burst` records with the same message (and the same exception) per `interval`
    seconds; the last one let through says that more are suppressed, the first after the interval says how many
    were. A fuzzer or a broken adapter then cannot write the same traceback thousands of times."""

    def __init__(self, burst: int = 5, interval: float = 60.0, max_keys: int = 1024):
        super().__init__()
        self.burst, self.interval, self.max_keys = burst, interval, max_keys
        self.seen: dict[tuple, list] = {}  # key -> [window start, let through, suppressed]

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "repeat_filter", None) is self:  # a second handler sees the same record
            return record.repeat_verdict
        record.repeat_filter, record.repeat_verdict = self, self.decide(record)
        return record.repeat_verdict

    def decide(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        key = (record.name, record.levelno, record.getMessage(), type(exc).__name__ if exc else None, str(exc))
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is None or now - entry[0] >= self.interval:
            suppressed = entry[2] if entry else 0
            if len(self.seen) >= self.max_keys:
                self.seen.pop(next(iter(self.seen)))
            self.seen[key] = entry = [now, 0, 0]
            if suppressed:
                self.annotate(record, f"[{suppressed} identical messages were suppressed in the last "
                                      f"{self.interval:g}s]")
        if entry[1] >= self.burst:
            entry[2] += 1
            return False
        entry[1] += 1
        if entry[1] == self.burst:
            self.annotate(record, f"[further identical messages are suppressed for {self.interval:g}s]")
        return True

    @staticmethod
    def annotate(record: logging.LogRecord, note: str) -> None:
        record.msg, record.args = f"{record.getMessage()} {note}", None


def limit_repeated_logs(filter_: RepeatFilter, logger_names=("", "uvicorn", "uvicorn.error", "uvicorn.access",
                                                             "fmforge")) -> None:
    """Put `filter_` on every handler of these loggers (a handler's filter sees propagated records too)."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if filter_ not in handler.filters:
                handler.addFilter(filter_)
