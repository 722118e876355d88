"""The raw Python floor: what the service's targeted path costs at its very least in Python.

asyncio protocols on uvloop, httptools' parser, hiredis, WebSocket frames written by hand: no
uvicorn, no ASGI, no websockets, no redis-py; one `PUBLISH` per publish, written at once. It speaks
the bench's protocol for targeted notifications and broadcasts only (a client's join is ignored, so
the topic session does not apply): `/ws?token=<JWT>` gets a `welcome`, `POST /notify/{user}` and
`POST /broadcast` (publisher JWT, kept until its `exp`) publish `{"type":"notification",...}`.
Opt-in in the bench (`--only notify,raw-python,lean-node`): it answers how much of the gap to lean-node
is Python's and how much is the service's own path (docs/bench/profile.md).

    BENCH_SECRET=... python -m tests.load.raw_server --port 8005 --redis redis://127.0.0.1:6390/0 --channel bench
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import httptools
import jwt
import orjson
import uvloop

from .serve import command_line

PUBLISH_SCOPE = "notify:publish"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def frame(payload: bytes) -> bytes:
    """A server's unmasked text frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + struct.pack("!H", n) + payload
    return b"\x81\x7f" + struct.pack("!Q", n) + payload


Reply = Callable[[Any], None]


def _ignore(reply: Any) -> None:
    return None


class RedisConn(asyncio.Protocol):
    """One Redis connection: commands written at once, replies handed to their callbacks in order;
    with `on_push`, a subscriber's messages go there."""

    def __init__(self, on_push: Callable[[bytes, bytes], None] | None = None) -> None:
        self.reader = hiredis.Reader()
        self.waiters: deque[Reply] = deque()
        self.on_push = on_push
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if self.on_push is not None and type(reply) is list and reply[0] == b"message":
                self.on_push(reply[1], reply[2])
            elif self.waiters:
                self.waiters.popleft()(reply)

    def command(self, *args: bytes, callback: Reply | None = None) -> None:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        self.transport.write(b"".join(out))
        self.waiters.append(callback or _ignore)


class State:
    """The process's sockets by user, its publishers' verified tokens, its two Redis connections."""

    def __init__(self, channel: str, secret: str) -> None:
        self.secret = secret
        self.prefix = f"{channel}:u:".encode()
        self.everyone = f"{channel}:all".encode()
        self.sockets: dict[bytes, set[Http]] = {}
        self.all: set[Http] = set()
        self.publishers: dict[bytes, dict[str, Any]] = {}
        self.pub: Any = None
        self.sub: Any = None

    def verify(self, token: str) -> dict[str, Any]:
        claims: dict[str, Any] = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp"]})
        return claims

    def on_message(self, channel: bytes, data: bytes) -> None:
        wire = frame(data)
        if channel == self.everyone:
            targets = self.all
        else:
            targets = self.sockets.get(channel[len(self.prefix) :], ())
        for proto in targets:
            proto.transport.write(wire)


class Http(asyncio.Protocol):
    """A connection: HTTP requests until a WebSocket upgrade, then a socket that only listens for close."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.ws_user: bytes | None = None
        self.transport: Any = None
        self.url = self.body = b""
        self.headers: dict[bytes, bytes] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        user = self.ws_user
        if user is not None:
            st = self.state
            st.all.discard(self)
            mine = st.sockets.get(user)
            if mine is not None:
                mine.discard(self)
                if not mine:
                    del st.sockets[user]
                    st.sub.command(b"UNSUBSCRIBE", st.prefix + user)

    def data_received(self, data: bytes) -> None:
        if self.ws_user is not None:
            if data and data[0] & 0x0F == 8:
                self.transport.write(b"\x88\x00")
                self.transport.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.upgrade()
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def respond(self, status: int, body: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )

    def on_message_complete(self) -> None:
        if self.parser.should_upgrade():
            return
        path = self.url.split(b"?", 1)[0]
        if path == b"/healthz":
            return self.respond(200, b'{"status":"ok"}')
        st = self.state
        if self.parser.get_method() != b"POST" or not (path == b"/broadcast" or path.startswith(b"/notify/")):
            return self.respond(404, b'{"error":"not_found"}')
        scheme, _, token = self.headers.get(b"authorization", b"").partition(b" ")
        token = token if scheme.lower() == b"bearer" else b""
        claims = st.publishers.get(token)
        if claims is None or claims["exp"] <= time.time():
            try:
                claims = st.publishers[token] = st.verify(token.decode())
            except jwt.PyJWTError:
                return self.respond(401, b'{"error":"invalid_token"}')
        if PUBLISH_SCOPE not in str(claims.get("scope", "")).split():
            return self.respond(403, b'{"error":"forbidden"}')
        try:
            note = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            note = None
        if not isinstance(note, dict) or not isinstance(note.get("event"), str):
            return self.respond(422, b'{"error":"invalid_request"}')
        ts = time.time_ns() // 1_000_000
        payload = orjson.dumps({"type": "notification", "event": note["event"], "data": note.get("data"), "ts": ts})
        channel = st.everyone if path == b"/broadcast" else st.prefix + unquote(path[8:].decode()).encode()
        answer = orjson.dumps({"ts": ts})
        st.pub.command(b"PUBLISH", channel, payload, callback=lambda r: self.respond(202, answer))

    def upgrade(self) -> None:
        st = self.state
        url = self.url
        query = url.split(b"?", 1)[1].decode() if b"?" in url else ""
        token = parse_qs(query).get("token", [None])[0]
        try:
            user = st.verify(token).get("sub") if token else None
        except jwt.PyJWTError:
            user = None
        key = self.headers.get(b"sec-websocket-key", b"")
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept
            + b"\r\n\r\n"
        )
        if not isinstance(user, str) or not user:
            self.transport.write(b"\x88\x02" + struct.pack("!H", 4401))
            self.transport.close()
            return
        u = user.encode()
        self.ws_user = u
        self.transport.write(frame(b'{"type":"welcome"}'))
        mine = st.sockets.get(u)
        if mine is None:
            mine = st.sockets[u] = set()
            st.sub.command(b"SUBSCRIBE", st.prefix + u)
        mine.add(self)
        st.all.add(self)


async def serve(port: int, redis_url: str, channel: str, secret: str) -> None:
    loop = asyncio.get_running_loop()
    st = State(channel, secret)
    url = urlsplit(redis_url)  # the bench's own Redis: no password, database 0
    host, port_ = url.hostname or "127.0.0.1", url.port or 6379
    _, st.pub = await loop.create_connection(RedisConn, host, port_)
    _, st.sub = await loop.create_connection(lambda: RedisConn(st.on_message), host, port_)
    st.sub.command(b"SUBSCRIBE", st.everyone)
    server = await loop.create_server(lambda: Http(st), "127.0.0.1", port, backlog=2048)
    await server.serve_forever()


def main() -> None:
    ns = command_line("tests.load.raw_server", "raw")
    uvloop.run(serve(ns.port, ns.redis, ns.channel, ns.secret))


if __name__ == "__main__":
    main()
