"""GET /events: the Server-Sent Events fallback for networks that break WebSockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from ..broker import frame_id
from ..errors import BrokerUnavailable, ServiceError
from ..frames import CloseCode
from ..hub import TooManyConnections
from ..models import ErrorBody
from ..runtime import Runtime
from .deps import ClientDep, RuntimeDep
from .stream import Resume, open_stream, schedule_expiry

router = APIRouter(tags=["client"])


class _TooMany(ServiceError):
    status_code = 429
    code = "too_many_connections"


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "One event per frame; `id:` is the notification id.",
        },
        401: {"model": ErrorBody},
        429: {
            "model": ErrorBody,
            "description": "Too many open streams for this user, or connections from this address"
            " (NOTIFY_MAX_CONNECTIONS_PER_IP; see Retry-After).",
        },
        503: {
            "model": ErrorBody,
            "description": "The replica is draining, or at NOTIFY_MAX_CONNECTIONS (see Retry-After).",
        },
    },
)
async def events(
    principal: ClientDep,
    runtime: RuntimeDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    since: Annotated[str | None, Query(max_length=64, description="Resume after this id (as Last-Event-ID).")] = None,
) -> StreamingResponse:
    """Stream the user's notifications; reconnecting with Last-Event-ID resumes like `since` on /ws.

    Ids are ordered across the user's and the broadcast stream, so one cursor resumes both."""
    if runtime.draining:
        raise BrokerUnavailable("replica is shutting down: reconnect to another one")
    if not runtime.hub.has_room(principal.user_id):
        raise _TooMany("too many connections for this user")
    cursor = last_event_id or since
    return StreamingResponse(
        _stream(runtime, principal.user_id, principal.expires_at, Resume(cursor, cursor)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _noop_closer(code: int, reason: str) -> None:
    """SSE has no close frame: the stream simply ends when the connection is closed."""


async def _stream(runtime: Runtime, user_id: str, expires_at: float, resume: Resume) -> AsyncIterator[str]:
    # Registered here, not in the route: a response that is never iterated (the client left at
    # once) never runs this generator's `finally`, and would leave the registration behind.
    yield "retry: 2000\n\n"
    try:
        conn = await open_stream(runtime, user_id, expires_at, resume, _noop_closer)
    except TooManyConnections:  # another stream took the last place since the route checked
        yield f'event: close\ndata: {{"code":{CloseCode.TOO_MANY}}}\n\n'
        return
    expiry = schedule_expiry(conn)
    heartbeat = runtime.settings.sse_heartbeat_seconds
    try:
        while True:
            try:
                async with asyncio.timeout(heartbeat):
                    batch = await conn.next_batch()
            except TimeoutError:
                yield ": heartbeat\n\n"
                continue
            if not batch:
                if conn.close_code is not None:
                    yield f'event: close\ndata: {{"code":{conn.close_code}}}\n\n'
                return
            yield "".join(map(_event, batch))
    finally:
        expiry.cancel()
        await runtime.hub.unregister(conn)


def _event(frame: str) -> str:
    id_ = frame_id(frame)
    return f"id: {id_}\ndata: {frame}\n\n" if id_ is not None else f"data: {frame}\n\n"
