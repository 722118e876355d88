"""BoundedWebSocketProtocol: uvicorn's sans-I/O WebSocket protocol, bounded in time and memory.

Bounded in time against peers that stop reading (a close never waits on a full buffer), and lean
per idle socket: an idle socket is mostly this object, so what uvicorn keeps for the whole life of
a connection but needs only for a moment is made on demand or let go after the handshake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import SecurityError
from websockets.http11 import Request
from websockets.protocol import State

from ..core.errors import HeadersTooLarge, MalformedRequest, ServiceError
from ..core.frames import SEND_EAGERLY_EXTENSION, SEND_FRAME_EXTENSION
from .seams import send_eagerly

# What the app sends to answer a handshake: accept it, refuse it with an HTTP response, or close it.
_ANSWERS = frozenset({"websocket.accept", "websocket.http.response.start", "websocket.close"})
# A peer gets this long to answer our close frame before its TCP connection is dropped.
WS_CLOSE_TIMEOUT_SECONDS = 3.0
# Once we close a socket, its last bytes get this long to leave; a peer that reads nothing is aborted.
CLOSE_GRACE_SECONDS = 2.0


class _Inbox:
    """What uvicorn uses of an asyncio.Queue for a socket's inbound events (put_nowait, get,
    empty), without its three deques and an Event, about 3 KB for each idle socket. One task (the
    app's) reads; clients send little, so the list is made only while events wait."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = [item]
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        assert self._items is not None
        item = self._items.pop(0)
        if not self._items:
            self._items = None
        return item

    def empty(self) -> bool:
        return not self._items


class _Flag:
    """asyncio.Event's set/clear/is_set/wait, with waiters kept only while someone waits."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        self._value = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if not self._value:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        return True


class _AbortingTransport:
    """The real transport, except that `close()` becomes `abort()` when the peer has not taken
    the last bytes within a grace period: a peer that reads nothing never lets a close complete,
    and would hold its socket, buffers and task until the kernel gave up minutes later."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self.write = transport.write  # every frame goes through here: no __getattr__ on the way
        self._loop = loop
        self._abort_timer: asyncio.TimerHandle | None = None
        self.lost = False

    def close(self) -> None:
        self._transport.close()
        if self._abort_timer is None and not self.lost:
            self._abort_timer = self._loop.call_later(CLOSE_GRACE_SECONDS, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.lost:
            self._transport.abort()

    def connection_lost(self) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, bounded against peers that stop reading.

    - The app's close is never held back by a full send buffer: the close frame is queued behind
      what is already buffered, the app is told the socket is gone, and the TCP connection is
      aborted if the peer has not completed the close after WS_CLOSE_TIMEOUT_SECONDS + grace.
    - Every other close (ping timeout, shutdown) likewise ends in an abort after the grace period.
    - A handshake the websockets parser refuses (a header line over 8 KB, more than 128 headers)
      is answered at once with a JSON error; uvicorn left the connection hanging.
    """

    # Set by the HTTP protocol that handed the connection over: frees the connection's place
    # under its client address (NOTIFY_MAX_CONNECTIONS_PER_IP) once it is closed.
    on_lost: Callable[[], None] | None = None
    # Likewise: frees its place among the handshakes in flight (exposure.MAX_HANDSHAKES_IN_FLIGHT) once the
    # app has answered the handshake (accepted, refused or closed it) or the connection is gone.
    on_answered: Callable[[], None] | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.close_timeout = WS_CLOSE_TIMEOUT_SECONDS
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_AbortingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.transport, _AbortingTransport):
            self.transport.connection_lost()
        self._answered()
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None and not self.close_sent:
            self._refuse_handshake(self.conn.handshake_exc)

    def _answered(self) -> None:
        callback, self.on_answered = self.on_answered, None
        if callback is not None:
            callback()

    def _refuse_handshake(self, exc: Exception) -> None:
        """The parser has given up on the request (its own answer, if any, is never written out by
        uvicorn): answer in the service's error shape and close."""
        self._answered()
        self.conn.data_to_send()  # websockets' plain-text answer, replaced by ours
        error: ServiceError
        if isinstance(exc, SecurityError):  # a line too long, too many headers
            error = HeadersTooLarge(f"WebSocket handshake refused: {exc}")
        else:
            error = MalformedRequest("WebSocket handshake refused: not a valid HTTP request")
        body = orjson.dumps(error.body())
        self.transport.write(
            b"".join(
                (
                    STATUS_LINE[error.status_code],
                    *(name + b": " + value + b"\r\n" for name, value in self.default_headers),
                    b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body),
                    body,
                )
            )
        )
        self.close_sent = self.handshake_complete = True
        self.transport.close()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app task has not started yet: offer it the direct write (see `send_frame`).
        if getattr(self, "scope", None) is not None:
            self.scope["extensions"][SEND_FRAME_EXTENSION] = self.send_frame
            self.scope["extensions"][SEND_EAGERLY_EXTENSION] = send_eagerly

    def send_frame(self, wire: bytes) -> bool:
        """Write an already-encoded text frame now, if the socket is open and its buffer has room.

        False means: use the ordinary ASGI send, which waits for room or reports the socket gone."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
        ):
            return False
        self.transport.write(wire)
        return True

    async def send(self, message: dict) -> None:  # type: ignore[override,type-arg]
        if self.on_answered is not None and message["type"] in _ANSWERS:
            self._answered()
        if (
            message["type"] == "websocket.close"
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and not self.writable.is_set()
        ):
            # The peer is not reading: waiting for room in the buffer to say goodbye would wait forever.
            self.writable.set()
        await super().send(message)  # type: ignore[arg-type]
        if message["type"] == "websocket.accept" and self.request is not None:
            # The parsed handshake is not read again (the app has the scope): about 3 KB a socket. The
            # parser's suspended frame still holds the request itself, so its headers are emptied.
            self.request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]
