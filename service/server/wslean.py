"""The parts of a socket's WebSocket protocol that are made lean: what an idle socket would
otherwise keep for its whole life (docs/capacity.md, "Memory per idle socket")."""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.server import ServerState
from websockets.datastructures import Headers
from websockets.protocol import Protocol
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from ..core.timers import TimerWheel


class Inbox:
    """What uvicorn uses of an asyncio.Queue for a socket's inbound events (put_nowait, get,
    empty), without its three deques and an Event, about 3 KB for each idle socket. One task (the
    app's) reads; clients send little, so the list is made only while events wait.

    `get` is a plain function that answers a Future, not a coroutine: the app's read of an idle
    socket is then one Future, where a coroutine here and uvicorn's `receive` above it would each
    keep a suspended frame for the socket's whole life."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] | None = None
        self._waiter: asyncio.Future[Any] | None = None

    def put_nowait(self, item: Any) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():  # a cancelled read takes nothing
            waiter.set_result(item)
        elif self._items is None:
            self._items = [item]
        else:
            self._items.append(item)

    def get(self) -> asyncio.Future[Any]:
        future = asyncio.get_running_loop().create_future()
        if self._items:
            future.set_result(self._items.pop(0))
            if not self._items:
                self._items = None
        else:
            self._waiter = future
        return future

    def empty(self) -> bool:
        return not self._items


NO_FRAMES: list[bytes] = []
NO_HEADERS = Headers()
NO_SUBPROTOCOLS: list[str] = []


class Flag:
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


class _ScopeRewriter:
    """Stands for uvicorn's ProxyHeadersMiddleware when its own `__call__` is run only for what it
    does to the scope (the client and scheme a trusted proxy forwarded): nothing is wrapped."""

    __slots__ = ("trusted_hosts", "app")

    def __init__(self, trusted_hosts: object) -> None:
        self.trusted_hosts = trusted_hosts
        self.app = _nothing

    def rewrite_scope(self, scope: Any) -> None:
        step = ProxyHeadersMiddleware.__call__(self, scope, _nothing, _nothing)  # type: ignore[arg-type]
        try:
            step.send(None)
        except StopIteration:
            return
        step.close()
        raise RuntimeError("the proxy-headers rewrite did not finish at once")


async def _nothing(*args: object) -> None:
    return None


class Shared:
    """What uvicorn's WebSocket protocol keeps per socket but is the same for every socket of a
    server: one of these per server, kept by each socket's protocol as a single reference."""

    __slots__ = (
        "config",
        "app",
        "loop",
        "app_state",
        "connections",
        "tasks",
        "default_headers",
        "_local",
        "timers",
        "proxy",
        "_asgi",
        "ping_interval",
        "ping_timeout",
        "_ping_at",
        "_ping_payload",
    )

    _last: Shared | None = None

    def __init__(self, config: Config, state: ServerState, app_state: dict[str, Any], loop: Any) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        # uvicorn's proxy-headers middleware would stay suspended under every socket for its whole
        # life, for a rewrite of the scope that is over before the app starts: the rewrite is run
        # here, by the middleware's own code (`rewrite_scope`), and the app it wraps is called directly.
        self.proxy: _ScopeRewriter | None = None
        if isinstance(self.app, ProxyHeadersMiddleware):
            self.proxy = _ScopeRewriter(self.app.trusted_hosts)
            self.app = self.app.app
        self.loop = loop or asyncio.get_event_loop()
        self.app_state = app_state
        self.connections = state.connections
        self.tasks = state.tasks
        self.default_headers = state.default_headers
        self._local: tuple[str, int] | None = None
        self._asgi = {"version": config.asgi_version, "spec_version": "2.4"}
        self.timers = TimerWheel(self.loop)  # every socket's keepalive deadline
        self.ping_interval: float | None = config.ws_ping_interval
        self.ping_timeout: float | None = config.ws_ping_timeout
        self._ping_at = -1.0
        self._ping_payload = b""

    def ping_payload(self, at: float) -> bytes:
        """A ping's payload, by which its pong is told from a stale one: random, and the same for
        the pings that go out together (`at`, the time of the timer wheel's slot they go out in)."""
        if at != self._ping_at:
            self._ping_at = at
            self._ping_payload = random.getrandbits(32).to_bytes(4, "big")
        return self._ping_payload

    def share_scope_values(self, scope: dict[str, Any]) -> None:
        scope["state"] = self.app_state
        if scope["asgi"] == self._asgi:
            scope["asgi"] = self._asgi
        if not scope["subprotocols"]:
            scope["subprotocols"] = NO_SUBPROTOCOLS
        scope["path"] = sys.intern(scope["path"])

    def local_address(self, address: tuple[str, int] | None) -> tuple[str, int] | None:
        if address is not None and address != self._local:
            self._local = address
        return self._local if address is not None else None

    @classmethod
    def of(cls, config: Config, state: ServerState, app_state: dict[str, Any], loop: Any) -> Shared:
        """The server's, made by its first socket (a process normally runs one server)."""
        last = cls._last
        if (
            last is None
            or last.config is not config
            or last.connections is not state.connections
            or last.app_state is not app_state
            or (loop is not None and last.loop is not loop)
        ):
            last = cls._last = cls(config, state, app_state, loop)
        return last


# The two bytes that open a ping frame from the server with a 4-byte payload: FIN and opcode 9,
# unmasked, length 4. A pong from the client answering it opens with FIN and opcode 10, masked,
# length 4; with its mask and payload it is 10 bytes.
PING4_HEAD = b"\x89\x04"
_PONG4_HEAD = b"\x8a\x84"
_AT_EOF = StreamReader.at_eof.__code__


def lone_pong(conn: ServerProtocol, data: bytes) -> bytes | None:
    """The 4-byte payload of the pong that `data` is, whole and nothing else, arriving between frames;
    else None, and `data` goes to websockets' parser.

    A keepalive's pong is most of what an idle socket ever sends, and websockets' generator-based
    parser spends more on its 10 bytes than the system calls do. Between frames (the parser waiting
    for a new one with nothing buffered: see `shed_handshake_parser`) a pong changes nothing of its
    state, so one read here leaves the parser as it finds the next frame."""
    if len(data) != 10 or data[0] != _PONG4_HEAD[0] or data[1] != _PONG4_HEAD[1]:
        return None
    if getattr(getattr(conn.parser, "gi_yieldfrom", None), "gi_code", None) is not _AT_EOF:
        return None
    return (int.from_bytes(data[2:6], "big") ^ int.from_bytes(data[6:], "big")).to_bytes(4, "big")


def shed_handshake_parser(conn: ServerProtocol) -> None:
    """Let go of the handshake's parser frame, about 400 bytes a socket.

    websockets parses frames in a generator that the server side starts inside the one that parsed
    the handshake (`ServerProtocol.parse` ends in `yield from Protocol.parse(self)`), so that frame,
    with the request it parsed, stays suspended for the socket's whole life. Where the frame parser
    is between frames (waiting for the next one, nothing buffered), a new one started on its own is
    in exactly the same state, and takes its place; otherwise the two are kept as they are."""
    outer = conn.parser
    inner = getattr(outer, "gi_yieldfrom", None)
    waiting = getattr(inner, "gi_yieldfrom", None)
    if (
        getattr(inner, "gi_code", None) is not Protocol.parse.__code__
        or getattr(waiting, "gi_code", None) is not StreamReader.at_eof.__code__
        or conn.reader.buffer
        or conn.reader.eof
    ):
        return
    fresh = Protocol.parse(conn)
    next(fresh)  # to its first wait for data, where the one it replaces stands
    conn.parser = fresh
    outer.close()  # type: ignore[union-attr]
