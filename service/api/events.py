"""GET /events: the Server-Sent Events fallback for networks that break WebSockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from ..auth.tokens import Principal
from ..core.errors import BrokerUnavailable, Forbidden, InvalidRequest, ServiceError, TooManyForUser
from ..core.frames import BadFrame, CloseCode
from ..core.topics import TopicError
from . import membership
from .deps import ClientDep, RuntimeDep
from .hooks import HookRefused, HookUnavailable
from .models import ErrorBody
from .runtime import Runtime
from .session import Resume, close_stream, entitle, open_stream, schedule_expiry
from .sse import Position

router = APIRouter(tags=["client"])


class _UnknownTopic(ServiceError):
    status_code = 404
    code = "unknown_namespace"


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "One event per frame; `id:` is the stream position (see docs/protocol.md).",
        },
        401: {"model": ErrorBody},
        403: {
            "model": ErrorBody,
            "description": "The token does not permit joining a topic asked for, or the namespace's join hook"
            " refused it (the body then carries the hook's `reason`, when it gave one).",
        },
        404: {"model": ErrorBody, "description": "A topic asked for is in no configured namespace."},
        422: {"model": ErrorBody, "description": "A topic name or the cursor is malformed."},
        429: {
            "model": ErrorBody,
            "description": "Too many open streams for this user, or connections from this address"
            " (NOTIFY_MAX_CONNECTIONS_PER_IP; see Retry-After).",
        },
        503: {
            "model": ErrorBody,
            "description": "The replica is draining, or at NOTIFY_MAX_CONNECTIONS (see Retry-After), or a"
            " topic's join hook gave no usable answer in time (`unavailable`).",
        },
    },
)
async def events(
    principal: ClientDep,
    runtime: RuntimeDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=8192)] = None,
    since: Annotated[
        str | None, Query(max_length=8192, description="Resume from this position (as Last-Event-ID).")
    ] = None,
    topics: Annotated[str | None, Query(max_length=8192, description="Topics to join, comma-separated.")] = None,
) -> StreamingResponse:
    """Stream the user's notifications, broadcasts and the topics asked for; reconnecting with
    Last-Event-ID resumes every one of them from its own position."""
    if runtime.draining:
        raise BrokerUnavailable("replica is shutting down: reconnect to another one")
    names = [name for name in (topics or "").split(",") if name]
    if len(names) > runtime.settings.max_topics_per_connection:
        raise InvalidRequest(f"at most {runtime.settings.max_topics_per_connection} topics per stream")
    for name in names:
        try:
            options = runtime.topics.options(name)
        except TopicError as exc:
            raise (_UnknownTopic if exc.code == "unknown_namespace" else InvalidRequest)(exc.message) from None
        if not runtime.topics.may_join(name, options, principal.user_id, principal.topics, None):
            raise Forbidden(f"this token does not permit joining {name!r}")
    admitted = await _ask_join_hooks(runtime, principal, names)
    position = Position.parse(last_event_id or since, len(names))
    if position is None:
        raise InvalidRequest("Last-Event-ID (or since) is not a position this service gave")
    if not runtime.hub.has_room(principal.user_id):
        raise TooManyForUser("too many connections for this user")
    return StreamingResponse(
        _stream(runtime, principal, names, position, admitted),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def _ask_join_hooks(runtime: Runtime, principal: Principal, names: list[str]) -> dict[str, Any]:
    """Each topic's join hook asked at once, before the stream starts: topic -> the hook's info
    (None without a hook). A refusal answers 403, else a hook without a usable answer 503."""
    admitted: dict[str, Any] = dict.fromkeys(names)
    hooked = {name: url for name in admitted if (url := runtime.topics.options(name).join_hook) is not None}
    if not hooked:
        return admitted
    assert runtime.hooks is not None
    calls = (runtime.hooks.join(str(url), principal.user_id, name, principal.claims) for name, url in hooked.items())
    answers = await asyncio.gather(*calls, return_exceptions=True)
    for failure in (HookRefused, HookUnavailable, BaseException):  # a refusal says the most
        if (first := next((a for a in answers if isinstance(a, failure)), None)) is not None:
            raise first
    admitted.update(zip(hooked, answers, strict=True))
    return admitted


async def _noop_closer(code: int, reason: str) -> None:
    """SSE has no close frame: the stream simply ends when the connection is closed."""


async def _stream(
    runtime: Runtime, principal: Principal, topics: list[str], position: Position, admitted: dict[str, Any]
) -> AsyncIterator[str]:
    # Registered here, not in the route: a response that is never iterated (the client left at
    # once) never runs this generator's `finally`, and would leave the registration behind.
    yield "retry: 2000\n\n"
    resume = Resume(position.ids[0], position.ids[1]) if position.resumed else Resume()
    try:
        # open_stream unregisters what it registered when it fails or is cancelled (the client
        # reset the connection during set-up), so nothing is left behind before this `try`.
        conn = await open_stream(runtime, principal.user_id, principal.expires_at, resume, _noop_closer)
    except TooManyForUser:  # another stream took the last place since the route checked
        yield f'event: close\ndata: {{"code":{CloseCode.TOO_MANY}}}\n\n'
        return
    expiry = schedule_expiry(conn)
    try:
        entitle(conn, principal, runtime)
        heartbeat = runtime.settings.sse_heartbeat_seconds
        for index, topic in enumerate(topics):
            join: dict[str, object] = {"type": "join", "topic": topic}
            if position.ids[2 + index] is not None:
                join["since"] = position.ids[2 + index]
            try:
                await membership.handle(join, conn, runtime, admitted)
            except BadFrame as exc:
                conn.send(exc.frame())
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
            yield "".join(position.event(frame, topics) for frame in batch)
    finally:
        expiry.cancel()
        await close_stream(runtime, conn)
