"""PublishingHttpProtocol: uvicorn's httptools protocol, with well-formed publishes answered in place.

A publish is most of what a busy replica serves over HTTP, and most of its cost was the ASGI
machinery around a few lines of work: a request-response cycle, a task through the middleware
stack, message dicts both ways, a header check per response header. A publish that `api.fastpath`
accepts skips all of that: its body is collected here, the publish runs, and the answer is written
straight to the transport. Every other request, and every publish the fast path refuses (it is then
handed to uvicorn as if nothing had happened), is uvicorn's own. Connection-level guards (header
timeout, ceilings) come first, from `guardedhttp.GuardedHttpProtocol`.
"""

from __future__ import annotations

import contextvars
import logging
import time
import urllib.parse

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..api.fastpath import (
    NOT_A_PUBLISH,
    FastPublish,
    Known,
    answer,
    answer_soon,
    error_answer,
    prepare,
    publish_target,
)
from ..api.runtime import Runtime
from ..core.errors import ServiceError
from ..telemetry import logs
from .guardedhttp import NO_EVENT, GuardedHttpProtocol
from .publishlane import split

logger = logging.getLogger("service")


class _Publish:
    """Stands where uvicorn keeps its request-response cycle while a publish is read and answered,
    with the fields uvicorn's own callbacks touch (connection lost, shutdown, a pipelined request)."""

    __slots__ = ("stream", "path", "headers", "body", "keep_alive", "disconnected", "response_complete")

    message_event = NO_EVENT

    def __init__(self, stream: str, path: str, headers: list[tuple[bytes, bytes]], keep_alive: bool) -> None:
        self.stream = stream
        self.path = path  # for the access log, query included
        self.headers = headers
        self.body = bytearray()
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False


class PublishingHttpProtocol(GuardedHttpProtocol):
    """See the module docstring. A publish is taken only when nothing else is in flight on the
    connection; pipelined requests behind it wait their turn as uvicorn makes them."""

    known_publisher: Known | None = None  # see `fastpath.Known`

    def data_received(self, data: bytes) -> None:
        # The publish lane (`server/publishlane.py`): once this connection's publisher is known, and
        # while nothing is in flight and httptools is between requests.
        if self.known_publisher is not None and self._admitted and not self._in_head and not self.pipeline:
            cycle = self.cycle
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing() and self._lane(data):
                return
        super().data_received(data)

    def _lane(self, data: bytes) -> bool:
        """Publish the one request `data` holds, as `on_message_complete` would; False when the lane
        does not take it (httptools reads it then, from its first byte)."""
        runtime: Runtime = self.app_state["runtime"]
        request = split(data, runtime.settings.max_payload_bytes)
        if request is None:
            return False
        path, headers, body = request
        stream = publish_target(path)
        if stream == NOT_A_PUBLISH:
            return False
        try:
            fast = prepare(runtime, stream, headers, body, self.known_publisher)
        except Exception:
            logger.exception("publish lane failed; httptools reads the request")
            return False
        if fast is None:
            return False  # the usual path refuses it in its usual way
        self.head_read()
        publish = _Publish(stream, path, headers, keep_alive=True)
        self.cycle = publish  # type: ignore[assignment]
        runtime.metrics.publish_lane.inc()
        self._start(publish, runtime, fast, soon=True)
        return True

    def serve_head(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.expect_100_continue:
            target = self._publish_target()
            if target is not None:
                keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
                self.cycle = _Publish(*target, self.headers, keep_alive)  # type: ignore[assignment]
                return
        HttpToolsProtocol.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        publish = self.cycle
        if type(publish) is not _Publish:
            super().on_body(body)
            return
        publish.body += body
        runtime: Runtime = self.app_state["runtime"]
        if len(publish.body) > runtime.settings.max_payload_bytes:
            self._hand_over(publish)  # the framework answers 413 without reading the rest

    def on_message_complete(self) -> None:
        publish = self.cycle
        if type(publish) is not _Publish:
            super().on_message_complete()
            return
        runtime: Runtime = self.app_state["runtime"]
        try:
            fast = prepare(runtime, publish.stream, publish.headers, bytes(publish.body), self.known_publisher)
        except Exception:
            logger.exception("publish fast path failed; the framework answers")
            fast = None
        if fast is None:
            self._hand_over(publish)
            super().on_message_complete()
            return
        self._start(publish, runtime, fast)

    def _start(self, publish: _Publish, runtime: Runtime, fast: FastPublish, soon: bool = False) -> None:
        """Publish and answer; `soon` (a request the lane read whole, nothing behind it): with no task
        where the broker can (`fastpath.answer_soon`), the answer written from the broker's reply."""
        self.known_publisher = (fast.token, fast.principal)
        started = time.perf_counter()
        rid = logs.request_id_of(publish.headers) if runtime.settings.access_log else None
        if soon:

            def reply(status: int, body: bytes, headers: list[tuple[bytes, bytes]], notification: str | None) -> None:
                self._answered(publish, started, rid, status, body, headers, notification)

            try:
                if answer_soon(runtime, fast, reply):
                    return
            except Exception:
                reply(*_unexpected(publish), None)
                return
        task = self.loop.create_task(self._answer(publish, runtime, fast, started, rid))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _publish_target(self) -> tuple[str, str] | None:
        """(the stream published to, path and query) of a publish request, None for any other request."""
        if self.parser.get_method() != b"POST" or self.parser.should_upgrade():
            return None
        try:
            url = httptools.parse_url(self.url)
            path = url.path.decode("ascii")
        except (httptools.HttpParserInvalidURLError, UnicodeDecodeError):
            return None
        path = urllib.parse.unquote(path) if "%" in path else path
        stream = publish_target(path)
        if stream == NOT_A_PUBLISH:
            return None
        return stream, path + ("?" + url.query.decode("latin-1") if url.query else "")

    def _hand_over(self, publish: _Publish) -> None:
        """Give the request to uvicorn after all, with the body read so far."""
        self.cycle = None  # type: ignore[assignment]
        HttpToolsProtocol.on_headers_complete(self)
        self.cycle.body = publish.body
        self.cycle.message_event.set()

    async def _answer(
        self, publish: _Publish, runtime: Runtime, fast: FastPublish, started: float, rid: str | None
    ) -> None:
        if rid is not None:
            logs.request_id.set(rid)  # in this task's own context: the request's log lines carry it
        try:
            status, body, headers = await answer(runtime, fast)
        except Exception:
            status, body, headers = _unexpected(publish)
        self._answered(publish, started, rid, status, body, headers, logs.notification_id.get())

    def _answered(
        self,
        publish: _Publish,
        started: float,
        rid: str | None,
        status: int,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        notification: str | None,
    ) -> None:
        """A publish's answer, and its access line (naming its request and notification), written
        in a context of its own: the same for a task's publish and for one with no task."""
        if rid is not None:
            headers.append((b"x-request-id", rid.encode("latin-1")))
        self._respond(publish, status, body, headers)
        if rid is not None:
            contextvars.Context().run(_log_access, rid, notification, publish.path, status, started)

    def _respond(self, publish: _Publish, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        if publish.response_complete or publish.disconnected or self.transport.is_closing():
            return  # (answered already: a failure after the answer is logged, never answered twice)
        self.write_response(status, body, headers, publish.keep_alive)
        publish.response_complete = True
        if not publish.keep_alive:
            self.transport.close()
        self.on_response_complete()


def _log_access(rid: str, notification: str | None, path: str, status: int, started: float) -> None:
    logs.request_id.set(rid)
    logs.notification_id.set(notification)
    logs.log_access("POST", path, status, started)


def _unexpected(publish: _Publish) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The answer to a publish that failed in our own code (logged, from inside its `except`): 500,
    and the connection closed after it."""
    logger.exception("publish failed")
    publish.keep_alive = False
    return error_answer(ServiceError("the publish failed unexpectedly"))
