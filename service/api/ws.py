"""GET /ws: the client socket. Authenticate, welcome, replay if asked, then deliver live."""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import QueryParams
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketState

from ..core.errors import BrokerUnavailable, InvalidToken, TooManyForUser
from ..core.frames import (
    DIRECT_WRITE_EXTENSION,
    PONG,
    SEND_EAGERLY_EXTENSION,
    SEND_FRAME_EXTENSION,
    BadFrame,
    CloseCode,
    encode,
    error,
    parse_client_frame,
)
from ..core.ids import parse_id
from ..core.ratelimit import TokenBucket
from ..core.timers import Deadline
from ..delivery.connection import Connection
from . import membership
from .runtime import Runtime
from .session import Resume, close_stream, entitle, open_stream, schedule_expiry

logger = logging.getLogger("service.ws")

PATH = "/ws"


async def serve_socket(scope: Scope, receive: Receive, send: Send) -> None:
    """GET /ws as a bare ASGI app; see docs/protocol.md for frames and close codes.

    The app hands sockets straight here rather than through the middleware and routing layers:
    every suspended frame lives as long as its socket, and an idle socket is mostly such frames."""
    websocket = WebSocket(scope, receive, send)
    runtime: Runtime = websocket.state.runtime
    # Headers and query are read here, once, into locals: Starlette's cached copies would stay with
    # the socket for its whole life.
    origin = authorization = None
    for name, value in scope["headers"]:
        if name == b"origin" and origin is None:
            origin = value.decode("latin-1")
        elif name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
    query = QueryParams(scope["query_string"])
    refusal = _refusal(runtime, origin)
    if refusal is not None:
        await websocket.send_denial_response(refusal)
        return
    try:
        principal = await runtime.verifier.verify(_token(authorization, query))
    except InvalidToken as exc:
        await _reject(websocket, CloseCode.UNAUTHORIZED, exc.message)
        return
    resume = Resume(query.get("since"), query.get("broadcast_since"))
    del query
    try:
        conn = await open_stream(runtime, principal.user_id, principal.expires_at, resume, _closer(websocket))
    except TooManyForUser:
        await _reject(websocket, CloseCode.TOO_MANY, "too many connections for this user")
        return
    try:
        entitle(conn, principal, runtime)
        await websocket.accept()
        # Nothing reads the handshake again; let it go (the query may hold the token, too).
        scope["headers"], scope["query_string"] = [], b""
        if (problem := resume.invalid()) is not None:
            conn.send(error("invalid_cursor", problem))
        await _serve(scope, receive, send, conn, runtime)
    finally:
        await close_stream(runtime, conn)


def _refusal(runtime: Runtime, origin: str | None) -> JSONResponse | None:
    if runtime.draining:
        return JSONResponse({"error": "draining", "message": "replica is shutting down"}, status_code=503)
    allowed = runtime.settings.allowed_origins
    # Browsers always send Origin; a client without one is not a browser and cannot be hijacked.
    if allowed and origin is not None and origin.rstrip("/") not in allowed:
        return JSONResponse({"error": "origin_not_allowed", "message": f"origin {origin!r} is not allowed"}, 403)
    return None


def _token(authorization: str | None, query: QueryParams) -> str | None:
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and credentials:
        return credentials.strip()
    return query.get("token")


async def _reject(websocket: WebSocket, code: int, reason: str) -> None:
    """Accept only to close with a code a browser can read; nothing else is sent."""
    await websocket.accept()
    await websocket.close(code, reason[:120])


def _closer(websocket: WebSocket) -> Any:
    async def close(code: int, reason: str) -> None:
        # The server's WebSocket protocol never lets a close wait on a full buffer: a peer that
        # reads nothing has its TCP connection aborted (wsprotocol.BoundedWebSocketProtocol).
        try:
            if websocket.application_state == WebSocketState.CONNECTED:
                await websocket.close(code, reason)
        except Exception:  # noqa: BLE001 - already gone
            return

    return close


async def _serve(scope: Scope, receive: Receive, send: Send, conn: Connection, runtime: Runtime) -> None:
    """Deliver and read frames on the raw ASGI `send` and `receive`, past Starlette's per-message
    state checks (and one suspended frame less per idle socket)."""

    def send_text(frame: str) -> Coroutine[Any, Any, None]:
        return send({"type": "websocket.send", "text": frame})  # type: ignore[return-value]

    offered = scope.get("extensions") or {}
    conn.attach(
        send_text,
        offered.get(SEND_FRAME_EXTENSION),
        offered.get(SEND_EAGERLY_EXTENSION),
        offered.get(DIRECT_WRITE_EXTENSION),
    )
    expiry = schedule_expiry(conn)
    try:
        expiry = await _receive_forever(receive, conn, runtime, expiry)
    finally:
        expiry.cancel()
        await conn.detach()


async def _receive_forever(receive: Receive, conn: Connection, runtime: Runtime, expiry: Deadline) -> Deadline:
    bucket = TokenBucket(runtime.settings.max_inbound_rate)
    while not conn.closed:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            break
        if bucket.take():
            conn.close(CloseCode.TOO_MANY, "too many frames per second")
            break
        text = message.get("text")
        try:
            if text is None:
                raise BadFrame("binary_not_supported", "send JSON text frames, not binary")
            frame = parse_client_frame(text)
            expiry = await _handle(frame, conn, runtime, expiry)
        except BadFrame as exc:
            runtime.metrics.errors.labels(exc.code).inc()
            conn.send(exc.frame())
    return expiry


async def _handle(frame: dict[str, Any], conn: Connection, runtime: Runtime, expiry: Deadline) -> Deadline:
    kind = frame["type"]
    if kind == "ping":
        conn.send(PONG)
    elif kind == "ack":
        up_to = frame.get("id")
        if not isinstance(up_to, str) or parse_id(up_to) is None:
            raise BadFrame("invalid_id", 'ack needs "id": a notification id')
        try:
            await runtime.mark_read(conn.user_id, up_to)
        except BrokerUnavailable as exc:
            raise BadFrame("unavailable", exc.message) from None
    elif kind == "refresh":
        token = frame.get("token")
        try:
            principal = await runtime.verifier.verify(token if isinstance(token, str) else None)
        except InvalidToken as exc:
            raise BadFrame("invalid_token", exc.message) from None
        if principal.user_id != conn.user_id:
            raise BadFrame("invalid_token", "the new token is for another user")
        expiry.cancel()
        conn.expires_at = principal.expires_at
        entitle(conn, principal, runtime)
        conn.send(encode({"type": "refreshed", "expires_at": int(principal.expires_at)}))
        return schedule_expiry(conn)
    elif kind in membership.TOPIC_FRAMES:
        await membership.handle(frame, conn, runtime)
    else:
        expected = "ping, ack, refresh, join, leave, publish, signal or presence"
        raise BadFrame("unknown_type", f"unknown frame type {kind[:40]!r}; expected {expected}")
    return expiry
