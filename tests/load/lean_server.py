"""The lean Python reference: a bare ASGI app on uvicorn with redis.asyncio, no framework.

What the service does at its simplest, as a floor to measure the service against: a client opens
`/ws?token=<JWT>` and gets a `welcome` frame; its replica subscribes to the exact Redis channel of
the token's `sub` while the user has a socket there, plus one broadcast channel. `POST /notify/{user}`
and `POST /broadcast` (publisher JWT) encode the frame once and PUBLISH it; each replica writes the
bytes it receives to its sockets of that user. A verified publisher token is kept until its `exp`,
as the service does. Topics at their simplest: `{"type":"join","topic":T}` (any name, anyone) adds the
socket to T's set, subscribes T's channel with its first socket here and answers `joined`;
`POST /topics/{T}` publishes to that channel. No history, no resume, no limits, no metrics, no access
log, no presence: everything the service adds on top is what the comparison prices.

    python -m tests.load.lean_server --port 8003 --redis redis://127.0.0.1:6390/0 --channel bench
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, unquote

import jwt
import orjson
import redis.asyncio as redis

from .serve import serve

PUBLISH_SCOPE = "notify:publish"
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
JSON = [(b"content-type", b"application/json")]


class LeanApp:
    def __init__(self, redis_url: str, channel: str, secret: str) -> None:
        self.secret = secret
        self.prefix = f"{channel}:u:"
        self.everyone = f"{channel}:all"
        self.redis = redis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.sockets: dict[str, set[Send]] = {}  # user -> this replica's open sockets of that user
        self.all: set[Send] = set()
        self.room_prefix = f"{channel}:t:"
        self.rooms: dict[str, set[Send]] = {}  # topic -> this replica's sockets in it
        self.room_ready: dict[str, asyncio.Future[Any]] = {}  # topic -> its channel's SUBSCRIBE
        # Verified publisher tokens, kept until their exp (a real server would bound this).
        self.publishers: dict[str, dict[str, Any]] = {}

    def verify(self, token: str | None) -> dict[str, Any]:
        if not token:
            raise jwt.InvalidTokenError("missing token")
        claims: dict[str, Any] = jwt.decode(token, self.secret, algorithms=["HS256"], options={"require": ["exp"]})
        return claims

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.socket(scope, receive, send)
        elif scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        reader: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.pubsub.subscribe(self.everyone)
                reader = asyncio.create_task(self.deliver_forever())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if reader is not None:
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
                await self.pubsub.aclose()
                await self.redis.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def deliver_forever(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] != "message":
                continue
            channel = message["channel"].decode()
            if channel == self.everyone:
                targets: Any = self.all
            elif channel.startswith(self.room_prefix):
                targets = self.rooms.get(channel[len(self.room_prefix) :], ())
            else:
                targets = self.sockets.get(channel[len(self.prefix) :], ())
            frame = {"type": "websocket.send", "bytes": None, "text": message["data"].decode()}
            for send in list(targets):
                with contextlib.suppress(Exception):  # a socket that went away meanwhile
                    await send(frame)

    async def socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        token = parse_qs(scope["query_string"].decode()).get("token", [None])[0]
        try:
            user = self.verify(token).get("sub")
        except jwt.PyJWTError:
            user = None
        if not isinstance(user, str) or not user:
            await send({"type": "websocket.close", "code": 4401})
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": '{"type":"welcome"}'})
        mine = self.sockets.setdefault(user, set())
        if not mine:
            await self.pubsub.subscribe(self.prefix + user)
        mine.add(send)
        self.all.add(send)
        rooms: list[str] = []
        try:
            while (message := await receive())["type"] != "websocket.disconnect":
                if message.get("text"):
                    await self.on_text(message["text"], send, rooms)
        finally:
            for room in rooms:
                members = self.rooms.get(room, set())
                members.discard(send)
                if not members:
                    self.rooms.pop(room, None)
                    self.room_ready.pop(room, None)
                    with contextlib.suppress(Exception):
                        await self.pubsub.unsubscribe(self.room_prefix + room)
            self.all.discard(send)
            mine.discard(send)
            if not mine and self.sockets.get(user) is mine:
                del self.sockets[user]
                with contextlib.suppress(Exception):
                    await self.pubsub.unsubscribe(self.prefix + user)

    async def on_text(self, text: str, send: Send, rooms: list[str]) -> None:
        """A join; anything else a client sends is ignored."""
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            return
        topic = frame.get("topic") if isinstance(frame, dict) and frame.get("type") == "join" else None
        if not isinstance(topic, str) or not topic or topic in rooms:
            return
        self.rooms.setdefault(topic, set()).add(send)
        rooms.append(topic)
        ready = self.room_ready.get(topic)
        if ready is None:
            ready = self.room_ready[topic] = asyncio.ensure_future(self.pubsub.subscribe(self.room_prefix + topic))
        await asyncio.shield(ready)  # `joined` only once the channel is subscribed
        await send({"type": "websocket.send", "text": orjson.dumps({"type": "joined", "topic": topic}).decode()})

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/healthz":
            return await respond(send, 200, b'{"status":"ok"}')
        if method != "POST" or not (path == "/broadcast" or path.startswith(("/notify/", "/topics/"))):
            return await respond(send, 404, b'{"error":"not_found"}')
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode().partition(" ")
        token = token if scheme.lower() == "bearer" else ""
        claims = self.publishers.get(token)
        if claims is None or claims["exp"] <= time.time():
            try:
                claims = self.publishers[token] = self.verify(token)
            except jwt.PyJWTError:
                return await respond(send, 401, b'{"error":"invalid_token"}')
        if PUBLISH_SCOPE not in str(claims.get("scope", "")).split():
            return await respond(send, 403, b'{"error":"forbidden"}')
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        try:
            note = orjson.loads(body)
        except orjson.JSONDecodeError:
            note = None
        if not isinstance(note, dict) or not isinstance(note.get("event"), str):
            return await respond(send, 422, b'{"error":"invalid_request"}')
        ts = time.time_ns() // 1_000_000
        frame = {"type": "notification", "event": note["event"], "data": note.get("data"), "ts": ts}
        if path == "/broadcast":
            await self.redis.publish(self.everyone, orjson.dumps(frame))
        elif path.startswith("/topics/"):
            topic = unquote(path[len("/topics/") :])
            await self.redis.publish(self.room_prefix + topic, orjson.dumps({**frame, "topic": topic}))
        else:
            await self.redis.publish(self.prefix + unquote(path[len("/notify/") :]), orjson.dumps(frame))
        await respond(send, 202, orjson.dumps({"ts": ts}))


async def respond(send: Send, status: int, body: bytes) -> None:
    headers = [*JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    serve("tests.load.lean_server", LeanApp, "lean")


if __name__ == "__main__":
    main()
