"""GuardedHttpProtocol: uvicorn's httptools protocol, safe to face clients without a proxy.

uvicorn arms no timer until a first response, and none at all while a request head trickles in:
a connection that sends nothing, or one header line every few seconds (slow-loris), holds its
descriptor for ever. Here every connection gets NOTIFY_HEADER_TIMEOUT_SECONDS, from opening or from
its previous response, to complete a request head; one that sent part of a head is told 408, one
that sent nothing is closed. A head is also bounded in size (431), uvicorn's parse errors are
answered as JSON like every other error, and the first request of each connection passes the
connection ceilings (`server/admission.py`), and each socket or stream handshake the handshake rate.
Everything happens before a request reaches the app, so it covers plain HTTP, SSE, WebSocket
handshakes and the publish fast path alike. The same clock keeps uvicorn's keep-alive timeout (a
connection idle that long after a response is closed, whether it is shorter or longer than the
header timeout): uvicorn arms a loop timer for it after every response and cancels it on the next
request's first bytes, a few microseconds a publish.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from ..core.errors import HeadersTooLarge, MalformedRequest, RequestTimeout, ServiceError
from .admission import EXEMPT_PATHS, HANDSHAKE_PATHS, MAX_HEAD_BYTES, Exposure

_JSON = b"content-type: application/json\r\ncontent-length: "


class _NoEvent:
    def set(self) -> None:
        pass


NO_EVENT = _NoEvent()


class _Answered:
    """Stands where uvicorn keeps its request-response cycle once the connection was answered here
    and is closing: uvicorn's callbacks see a complete response and leave the rest of the request be."""

    response_complete = True
    disconnected = False
    keep_alive = False
    message_event = NO_EVENT


_ANSWERED = _Answered()


class GuardedHttpProtocol(HttpToolsProtocol):
    """See the module docstring. `serve_head` is where a subclass takes a request over."""

    def __init__(self, *args: Any, exposure: Exposure, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exposure = exposure
        self._admitted = False
        self._client: str | None = None  # the address this connection is counted under, if any
        self._in_head = False
        self._head_bytes = 0
        self._heads = 0  # request heads completed on this connection
        self._head_deadline: float | None = None  # while waiting for a head
        self._idle_deadline: float | None = None  # after a response, until a next request begins: keep-alive
        self._head_timer: asyncio.TimerHandle | None = None
        self._handshake_wait = 0.0  # this head's handshake is held back this long (the handshake rate)

    # ---- the header timeout

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._client is not None:
            self.exposure.release(self._client)
            self._client = None
        super().connection_lost(exc)

    def _await_head(self, idle: bool = False) -> None:
        """Start the clock for the next request head; `idle` (after a response): the keep-alive
        timeout instead, until the next request's first byte starts its head's (`on_message_begin`),
        so a keep-alive longer than the header timeout is kept without giving a slow head more time."""
        now = self.loop.time()
        if idle and not self._in_head:  # (a head already begun behind the response keeps its clock)
            self._head_deadline, self._idle_deadline = None, now + self.timeout_keep_alive
            self._arm(self._idle_deadline)
        else:
            self._head_deadline, self._idle_deadline = now + self.exposure.header_timeout, None
            self._arm(self._head_deadline)

    def _arm(self, due: float) -> None:
        """One timer serves many requests: it is re-armed when it fires early, not set again for
        every response of a busy connection; only one armed for a later time is replaced."""
        timer = self._head_timer
        if timer is not None and timer.when() > due:
            timer.cancel()
            timer = None
        if timer is None:
            self._head_timer = self.loop.call_at(due, self._head_clock)

    def _head_clock(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        idle = self._idle_deadline
        if idle is not None:
            if now >= idle:
                self.transport.close()  # kept alive long enough, as uvicorn's timeout_keep_alive_handler
            else:
                self._head_timer = self.loop.call_at(idle, self._head_clock)
            return
        deadline = self._head_deadline
        if deadline is None:
            return
        if now < deadline:
            self._head_timer = self.loop.call_at(deadline, self._head_clock)
            return
        self.exposure.timed_out(self._in_head)
        if self._in_head:
            timeout = self.exposure.header_timeout
            self.answer(RequestTimeout(f"no complete request head within {timeout:g} s"))
        else:
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        if self._idle_deadline is not None:  # a kept-alive connection's next request: its head's clock starts
            self._idle_deadline = None
            self._head_deadline = deadline = self.loop.time() + self.exposure.header_timeout
            self._arm(deadline)

    def data_received(self, data: bytes) -> None:
        # Counted only when the whole chunk belongs to the head still unfinished after it: never a
        # body's bytes (no false 431), at the cost of missing the first chunk of a head that
        # starts behind a body. Either way httptools holds no more than the limit and two chunks.
        countable = self._in_head or not self._heads
        heads = self._heads
        super().data_received(data)
        if countable and self._in_head and heads == self._heads:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.answer(HeadersTooLarge(f"the request head is over {MAX_HEAD_BYTES} bytes"))

    def on_response_complete(self) -> None:
        # uvicorn's, with its keep-alive timeout on the head clock (see the module docstring).
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # the next request's head is in already
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._await_head(idle=True)

    # ---- each request head

    def on_headers_complete(self) -> None:
        self.head_read()
        if self.cycle is _ANSWERED:
            return  # pipelined behind a request answered here
        if self.cycle is not None and self.parser.should_upgrade() and not self._upgrade_after_cycle():
            return
        if not self._admitted and not self._admit():
            return
        if self.exposure.handshake_rate is not None and not self._handshake_paced():
            return
        self.serve_head()

    def head_read(self) -> None:
        """A request head is complete: its clock stops (also for a head read outside httptools)."""
        self._in_head = False
        self._heads += 1
        self._head_deadline = self._idle_deadline = None

    def _upgrade_after_cycle(self) -> bool:
        """An upgrade (a WebSocket handshake) on a connection that served a request before, as a
        proxy's keep-alive connection does: uvicorn makes no cycle for an upgrade, so the previous
        request's would stand for this one when its end is parsed, and a publish answered in place
        (`server/httpprotocol.py`) would be published a second time. False: not served (the connection is
        closed), when the previous request is still being answered and is not uvicorn's."""
        if self.cycle.response_complete:
            self.cycle = None  # type: ignore[assignment]
            return True
        if isinstance(self.cycle, RequestResponseCycle):
            return True  # uvicorn's own pipelining, as uvicorn does it
        self.cycle = _ANSWERED  # type: ignore[assignment]
        self.transport.close()
        return False

    def serve_head(self) -> None:
        """Serve a request whose head is complete; uvicorn's own handling unless overridden."""
        HttpToolsProtocol.on_headers_complete(self)

    def _admit(self) -> bool:
        exposure = self.exposure
        client = self.client[0] if self.client else None
        if exposure.max_per_ip is not None:
            forwarded = None
            for name, value in self.headers:
                if name == b"x-forwarded-for":
                    forwarded = value
            client = exposure.client_of(client, forwarded)
        refusal = exposure.admit(len(self.connections), client)
        if refusal is None:
            self._admitted = True
            if exposure.max_per_ip is not None:
                self._client = client
            return True
        if self._path() in EXEMPT_PATHS:
            return True  # served, and this connection is still not admitted
        exposure.refused(refusal, client)
        self.answer(refusal)
        return False

    def _handshake_paced(self) -> bool:
        """A socket's or stream's handshake under NOTIFY_MAX_HANDSHAKE_RATE: False when it is
        refused (429, answered here before the app reads its token); when its turn is still to
        come, it is held back until then (`handle_websocket_upgrade`, `_start_asgi_task`)."""
        self._handshake_wait = 0.0
        if self.parser.get_method() != b"GET" or self._path() not in HANDSHAKE_PATHS:
            return True
        turn = self.exposure.handshake()
        if isinstance(turn, ServiceError):
            self.exposure.refused(turn, None)
            self.answer(turn)
            return False
        self._handshake_wait = turn
        return True

    def _path(self) -> str | None:
        try:
            return httptools.parse_url(self.url).path.decode("latin-1")
        except httptools.HttpParserInvalidURLError:
            return None

    def handle_websocket_upgrade(self) -> None:
        if self.transport.is_closing():
            return  # the handshake was refused
        # Its turn under the handshake rate, if there is one, and always a place among the
        # handshakes in flight: every connection is accepted at once (acceptor.py), and a thousand
        # handshakes reading history together would take every connection of the Redis pool.
        # Nothing more is read from the connection until then.
        wait, self._handshake_wait = self._handshake_wait, 0.0
        self.transport.pause_reading()
        if wait:
            self.loop.call_later(wait, self._upgrade_in_turn)
        else:
            self._upgrade_in_turn()

    def _upgrade_in_turn(self) -> None:
        if not self.transport.is_closing():  # else the client left while it waited
            self.exposure.begin_handshake(self._upgrade_in_flight)

    def _upgrade_in_flight(self) -> None:
        if self.transport.is_closing():
            self.exposure.end_handshake()
            return
        self._upgrade()
        self.transport.get_protocol().on_answered = self.exposure.end_handshake  # type: ignore[attr-defined]
        self.transport.resume_reading()

    def _upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # The parser holds this protocol's bound callbacks, a cycle that only a collection frees:
        # a burst of handshakes would otherwise leave a few KB a socket to the oldest generation.
        self.parser = None  # type: ignore[assignment]
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._client is not None:
            # The socket's protocol owns the connection from here: its close frees the address's place.
            self.transport.get_protocol().on_lost = self.exposure.releaser(self._client)  # type: ignore[attr-defined]
            self._client = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        wait, self._handshake_wait = self._handshake_wait, 0.0
        if wait:  # an event stream whose turn under the handshake rate is to come
            self.loop.call_later(wait, self._start_in_turn, cycle, app)
            return
        super()._start_asgi_task(cycle, app)

    def _start_in_turn(self, cycle: RequestResponseCycle, app: Any) -> None:
        if cycle.disconnected or self.transport.is_closing():
            return  # the client left while it waited
        super()._start_asgi_task(cycle, app)

    # ---- answers written here

    def send_400_response(self, msg: str) -> None:
        self.answer(MalformedRequest(f"not a valid HTTP request: {msg}"))

    def answer(self, error: ServiceError) -> None:
        """Answer with `error` as JSON, and close the connection. Behind a response still being
        written (a head trickling in after an event stream, say) there is no room for an answer:
        the connection is only closed, and the request in flight learns it as uvicorn tells it."""
        if self.cycle is None or self.cycle.response_complete:
            headers = [(name.lower().encode(), value.encode()) for name, value in error.headers().items()]
            self.write_response(error.status_code, orjson.dumps(error.body()), headers, keep_alive=False)
            self.cycle = _ANSWERED  # type: ignore[assignment]
        self.transport.close()

    def write_response(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool = True
    ) -> None:
        """A complete JSON response, written straight to the transport."""
        out = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            out += (name, b": ", value, b"\r\n")
        out += (_JSON, b"%d\r\n" % len(body), b"" if keep_alive else b"connection: close\r\n", b"\r\n", body)
        self.transport.write(b"".join(out))
