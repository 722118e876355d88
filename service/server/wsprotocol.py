"""BoundedWebSocketProtocol: uvicorn's sans-I/O WebSocket protocol, bounded in time and memory.

Bounded in time against peers that stop reading (a close never waits on a full buffer), and lean
per idle socket: an idle socket is mostly this object, so what uvicorn keeps for the whole life of
a connection but needs only for a moment is made on demand or let go after the handshake.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.exceptions import SecurityError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

from ..core.errors import HeadersTooLarge, MalformedRequest, ServiceError
from ..core.frames import DIRECT_WRITE_EXTENSION, SEND_EAGERLY_EXTENSION, SEND_FRAME_EXTENSION
from .seams import send_eagerly
from .wslean import NO_FRAMES, NO_HEADERS, PING4_HEAD, Flag, Inbox, Shared, lone_pong, shed_handshake_parser

# What the app sends to answer a handshake: accept it, refuse it with an HTTP response, or close it.
_ANSWERS = frozenset({"websocket.accept", "websocket.http.response.start", "websocket.close"})
# A peer gets this long to answer our close frame before its TCP connection is dropped.
WS_CLOSE_TIMEOUT_SECONDS = 3.0
# Once we close a socket, its last bytes get this long to leave; a peer that reads nothing is aborted.
CLOSE_GRACE_SECONDS = 2.0
# Slack in comparing the keepalive's times, all of them on the timer wheel's grid; and how late its
# deadline may run and still count as at its slot's time (a peer gets no less time to answer a ping
# because the loop was busy when it should have gone out).
_EARLY_SECONDS = 0.01
_LATE_SECONDS = 0.1


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

    def is_closing(self) -> bool:  # asked before every ping: not through __getattr__'s failed lookup
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class _GatedServerProtocol(ServerProtocol):
    """websockets' server protocol, telling the socket's protocol of each change of its state (all
    of them go through this setter), so that `direct_write` is right at every turn."""

    owner: BoundedWebSocketProtocol | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.owner = None  # named first, as every attribute it is ever given (its own keys stay shared)
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        if self.debug:
            self.logger.debug("= connection is %s", state.name)
        self._state = state
        if self.owner is not None:
            self.owner.regate()


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, bounded against peers that stop reading.

    - The app's close is never held back by a full send buffer: the close frame is queued behind
      what is already buffered, the app is told the socket is gone, and the TCP connection is
      aborted if the peer has not completed the close after WS_CLOSE_TIMEOUT_SECONDS + grace.
    - Every other close (ping timeout, shutdown) likewise ends in an abort after the grace period.
    - A handshake the websockets parser refuses (a header line over 8 KB, more than 128 headers)
      is answered at once with a JSON error; uvicorn left the connection hanging.
    """

    # uvicorn's __init__ gives every socket some forty attributes, which CPython then keeps in a
    # dict of each socket's own (about 1.5 KB) instead of inline, sharing the class's keys. It keeps
    # them inline only while every name an instance is given is one the class knew when that
    # instance was made, and the class stops learning names after a few dozen instances: so what is
    # the same for every socket of a server is read through one `Shared`, and `__init__` names every
    # attribute a socket is ever given (tests/test_idle_socket.py checks that it does).
    logger = logging.getLogger("uvicorn.error")
    close_timeout = WS_CLOSE_TIMEOUT_SECONDS

    config = property(lambda self: self._shared.config)
    app = property(lambda self: self._shared.app)
    loop = property(lambda self: self._shared.loop)
    app_state = property(lambda self: self._shared.app_state)
    connections = property(lambda self: self._shared.connections)
    tasks = property(lambda self: self._shared.tasks)
    default_headers = property(lambda self: self._shared.default_headers)
    root_path = property(lambda self: self._shared.config.root_path)
    asgi_version = property(lambda self: self._shared.config.asgi_version)
    ping_interval = property(lambda self: self._shared.config.ws_ping_interval)
    ping_timeout = property(lambda self: self._shared.config.ws_ping_timeout)

    # A frame may go straight to the transport (`direct_write`) only while the socket is open, its
    # handshake done, no close sent, not gone and the transport taking data: each flag's setter, the
    # flow control's two calls and the websockets state's setter set it again.
    direct_write: Callable[[bytes], object] | None
    on_regate: Callable[[], object] | None  # the connection's, told of every change (`WriteGate`)

    handshake_complete = property(
        lambda self: self._handshake_complete, lambda self, value: self._flag("_handshake_complete", value)
    )
    close_sent = property(lambda self: self._close_sent, lambda self, value: self._flag("_close_sent", value))
    disconnected = property(lambda self: self._disconnected, lambda self, value: self._flag("_disconnected", value))

    def _flag(self, name: str, value: bool) -> None:
        setattr(self, name, value)
        self.regate()

    def regate(self) -> None:
        self.direct_write = (
            self.transport.write
            if self._handshake_complete
            and not self._close_sent
            and not self._disconnected
            and self.writable.is_set()
            and self.conn.state is State.OPEN
            else None
        )
        if self.on_regate is not None:
            self.on_regate()  # the connection keeps the write itself (`Connection.direct`)

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's own __init__ is not called (see above); this is what it does, per socket.
        self._handshake_complete = self._close_sent = self._disconnected = False
        self.direct_write = self.on_regate = None  # named here, as every attribute a socket is given (see wslean)
        self._shared = Shared.of(config, server_state, app_state, _loop)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.server = self.client = self.scheme = None  # type: ignore[assignment]
        self.request: Request | None = None
        self.response: Response | None = None
        self.scope: Any = None
        self.handshake_initiated = False  # the other three flags are named first, above
        self.close_timer: Any = None
        self.initial_response = None
        self.read_paused = False
        self.ping_timer: Any = None
        self.pong_timer: Any = None
        self.pending_ping_payload: bytes | None = None
        self.ping_sent_at = self.last_ping_rtt = 0.0  # the second is uvicorn's, unused here
        # Replaced, never appended to, when a message starts (websockets refuses a continuation first).
        self.frames = NO_FRAMES
        self.curr_msg_data_type = "bytes"  # type: ignore[assignment]
        # Set by the HTTP protocol that handed the connection over: `on_lost` frees the connection's
        # place under its client address (NOTIFY_MAX_CONNECTIONS_PER_IP) once it is closed,
        # `on_answered` its place among the handshakes in flight (exposure.MAX_HANDSHAKES_IN_FLIGHT)
        # once the app has answered the handshake (accepted, refused or closed it) or the
        # connection is gone.
        self.on_lost: Callable[[], None] | None = None
        self.on_answered: Callable[[], None] | None = None
        extensions = None  # websockets reads None as no extensions: no empty list kept per socket
        if config.ws_per_message_deflate:
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_max_window_bits=12, client_max_window_bits=12, compress_settings={"memLevel": 5}
                )
            ]
        self.conn = _GatedServerProtocol(extensions=extensions, max_size=config.ws_max_size, logger=self.logger)
        self.conn.owner = self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_AbortingTransport(transport, self.loop))  # type: ignore[arg-type]
        # Every socket has the same local address, and those behind one proxy the same peer host:
        # one copy each, not one per socket.
        self.server = self._shared.local_address(self.server)
        if self.client is not None:
            self.client = (sys.intern(self.client[0]), self.client[1])

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.transport, _AbortingTransport):
            self.transport.connection_lost()
        self._answered()
        if self.on_lost is not None:
            self.on_lost()
            self.on_lost = None
        super().connection_lost(exc)
        # No cycle left for the collector: a gone socket's state no longer matters.
        self.conn.owner = None
        self.on_regate = None

    def data_received(self, data: bytes) -> None:
        if self.pending_ping_payload is not None and len(data) == 10 and self.conn.state is State.OPEN:
            payload = lone_pong(self.conn, data)
            if payload is not None:
                if payload == self.pending_ping_payload:  # else stale or unsolicited, and ignored
                    self.pending_ping_payload = None
                return
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
        # The app task has not started yet: rewrite its scope as the proxy-headers middleware
        # would have, and offer it the direct write (see `send_frame`).
        if getattr(self, "scope", None) is not None:
            # uvicorn gives each socket a copy of the lifespan state, its own `asgi` dict, path and
            # list of subprotocols; the socket handler only reads them, so the values that are the
            # same for every socket are one shared copy rather than one kept per socket.
            self._shared.share_scope_values(self.scope)
            if self._shared.proxy is not None:
                self._shared.proxy.rewrite_scope(self.scope)
            self.scope["extensions"][SEND_FRAME_EXTENSION] = self.send_frame
            self.scope["extensions"][SEND_EAGERLY_EXTENSION] = send_eagerly
            self.scope["extensions"][DIRECT_WRITE_EXTENSION] = self

    def send_frame(self, wire: bytes) -> bool:
        """Write an already-encoded text frame now, if the socket is open and its buffer has room.

        False means: use the ordinary ASGI send, which waits for room or reports the socket gone."""
        write = self.direct_write
        if write is None:
            return False
        write(wire)
        return True

    def pause_writing(self) -> None:
        super().pause_writing()
        self.regate()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.regate()

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
            # Its path too: it holds the query, and so the token when the client put it there.
            self.request.headers = NO_HEADERS
            self.request.path = ""
            self.request = self.response = None  # type: ignore[assignment]
            shed_handshake_parser(self.conn)

    # Liveness pings, with one deadline per socket on the server's TimerWheel rather than uvicorn's
    # two loop timers (the next ping, and the pong's deadline cancelled by every pong). As uvicorn
    # does: a ping every interval from the last one's sending, a socket whose ping is unanswered
    # for the timeout closed with 1011, stale and unsolicited pongs ignored.

    def schedule_ping(self) -> None:
        """The keepalive's first look, an interval from now."""
        shared = self._shared
        assert shared.ping_interval is not None
        self.ping_timer = shared.timers.call_later(  # type: ignore[assignment]
            shared.ping_interval, self, BoundedWebSocketProtocol.send_keepalive_ping
        )

    def send_keepalive_ping(self) -> None:
        """The deadline: close a socket whose ping went unanswered for the timeout, else ping when
        one is due, then set the deadline again for whichever comes first of the two.

        Times are the wheel's slots, not the loop's clock: a ping is sent at its slot's time (if
        late by however long the loop was busy) and the next one's slot is an interval on, so a
        replica's pings keep their interval, and the sockets pinged together stay together."""
        deadline, self.ping_timer = self.ping_timer, None
        if self.close_sent or self.transport.is_closing():
            return
        shared, timers = self._shared, self._shared.timers
        interval, timeout = shared.ping_interval, shared.ping_timeout
        assert interval is not None
        now = shared.loop.time()
        at = timers.time_of(deadline) if deadline is not None else now
        if now - at > _LATE_SECONDS:  # the loop was held up: times start again from now
            at = now
        pending = self.pending_ping_payload is not None
        if pending and timeout is not None:
            if at - self.ping_sent_at >= timeout - _EARLY_SECONDS:
                self.keepalive_timeout()
                return
        elif at - self.ping_sent_at >= interval - _EARLY_SECONDS:
            self.pending_ping_payload = payload = shared.ping_payload(at)
            self.ping_sent_at = at
            pending = True
            if self.conn.state is State.OPEN:  # the frame as websockets would write it, without its encoder
                self.transport.write(PING4_HEAD + payload)
            else:
                self.conn.send_ping(payload)
                self.transport.write(b"".join(self.conn.data_to_send()))
        due = self.ping_sent_at + interval
        if pending and timeout is not None:
            # The next ping's time while it is to come (its pong will most likely be in by then),
            # and once it is past with the pong still out, the timeout's.
            expiry = self.ping_sent_at + timeout
            due = min(due, expiry) if due > at + _EARLY_SECONDS else expiry
        self.ping_timer = timers.call_at(  # type: ignore[assignment]
            due, self, BoundedWebSocketProtocol.send_keepalive_ping, deadline
        )

    def handle_pong(self, event: Frame) -> None:
        """A pong answers the ping in flight if it carries its payload (as `data_received` reads a
        lone one); nothing else is done until the deadline comes, at the next ping's time."""
        if bytes(event.data) == self.pending_ping_payload:
            self.pending_ping_payload = None

    def receive(self) -> asyncio.Future[Any]:  # type: ignore[override]
        """uvicorn's `receive`, answering the inbox's Future rather than being a coroutine that
        awaits it (see `wslean.Inbox`). Reading, paused while a message waits for the app, resumes once
        the app asks for the next one with none left."""
        message = self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message
