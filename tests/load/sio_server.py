"""The comparison server: python-socketio with its Redis manager under uvicorn.

Set up the way python-socketio's documentation describes for several servers behind one Redis:
`socketio.AsyncServer(async_mode="asgi", client_manager=socketio.AsyncRedisManager(url))` wrapped in
`socketio.ASGIApp` around a small Starlette app. A client authenticates with `auth={"token": <JWT>}`
and joins a room named after its `sub`; backends `POST /notify/{user}` (emits to the room) and
`POST /broadcast` (emits to everyone) with a publisher JWT, like the service's publish API. Rooms as
topics: a client emits `join` with a room's name and an ack, the handler calls `enter_room` and acknowledges
`{"ok": true}`; `POST /topics/{room}` emits to the room.

    python -m tests.load.sio_server --port 8001 --redis redis://127.0.0.1:6390/0 --channel bench
"""

from __future__ import annotations

import time

import jwt
import orjson
import socketio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .serve import serve

PUBLISH_SCOPE = "notify:publish"


def build(redis_url: str, channel: str, secret: str) -> socketio.ASGIApp:
    manager = socketio.AsyncRedisManager(redis_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins=[])

    def verify(token: object) -> dict[str, object]:
        if not isinstance(token, str):
            raise jwt.InvalidTokenError("missing token")
        claims: dict[str, object] = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
        return claims

    @sio.event
    async def connect(sid: str, environ: dict[str, object], auth: object) -> None:
        try:
            claims = verify(auth.get("token") if isinstance(auth, dict) else None)
        except jwt.PyJWTError as exc:
            raise socketio.exceptions.ConnectionRefusedError("invalid token") from exc
        user = claims.get("sub")
        if not isinstance(user, str) or not user:
            raise socketio.exceptions.ConnectionRefusedError("token lacks sub")
        await sio.enter_room(sid, user)

    @sio.on("join")
    async def join(sid: str, room: object) -> dict[str, object]:
        if not isinstance(room, str) or not 0 < len(room) <= 200:
            return {"ok": False, "error": "invalid room"}
        await sio.enter_room(sid, room)
        return {"ok": True}

    def publisher(request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        try:
            claims = verify(token if scheme.lower() == "bearer" else None)
        except jwt.PyJWTError:
            return Response(b'{"error":"invalid_token"}', 401, media_type="application/json")
        if PUBLISH_SCOPE not in str(claims.get("scope", "")).split():
            return Response(b'{"error":"forbidden"}', 403, media_type="application/json")
        return None

    async def body_of(request: Request) -> dict[str, object] | None:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return None
        return body if isinstance(body, dict) and isinstance(body.get("event"), str) else None

    async def notify(request: Request) -> Response:
        if (denied := publisher(request)) is not None:
            return denied
        if (body := await body_of(request)) is None:
            return Response(b'{"error":"invalid_request"}', 422, media_type="application/json")
        ts = time.time_ns() // 1_000_000
        await sio.emit(
            "notification",
            {"event": body["event"], "data": body.get("data"), "ts": ts},
            room=request.path_params["user"],
        )
        return Response(orjson.dumps({"ts": ts}), 202, media_type="application/json")

    async def broadcast(request: Request) -> Response:
        if (denied := publisher(request)) is not None:
            return denied
        if (body := await body_of(request)) is None:
            return Response(b'{"error":"invalid_request"}', 422, media_type="application/json")
        ts = time.time_ns() // 1_000_000
        await sio.emit("notification", {"event": body["event"], "data": body.get("data"), "ts": ts, "broadcast": True})
        return Response(orjson.dumps({"ts": ts}), 202, media_type="application/json")

    async def topic(request: Request) -> Response:
        if (denied := publisher(request)) is not None:
            return denied
        if (body := await body_of(request)) is None:
            return Response(b'{"error":"invalid_request"}', 422, media_type="application/json")
        ts = time.time_ns() // 1_000_000
        room = request.path_params["topic"]
        await sio.emit(
            "notification", {"topic": room, "event": body["event"], "data": body.get("data"), "ts": ts}, room=room
        )
        return Response(orjson.dumps({"ts": ts}), 202, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    routes = [
        Route("/notify/{user:path}", notify, methods=["POST"]),
        Route("/broadcast", broadcast, methods=["POST"]),
        Route("/topics/{topic:path}", topic, methods=["POST"]),
        Route("/healthz", healthz),
    ]
    return socketio.ASGIApp(sio, other_asgi_app=Starlette(routes=routes))


def main() -> None:
    serve("tests.load.sio_server", build, "socketio")


if __name__ == "__main__":
    main()
