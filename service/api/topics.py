"""Topics for backends: publish, presence and history; moderation (remove a member, disconnect a user)."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query

from ..core.streams import topic_stream, user_stream
from ..delivery.hub import DISCONNECT, REMOVE, control
from .body import JsonRoute
from .deps import AdminDep, PublisherDep, ReaderDep, RuntimeDep
from .models import (
    NOTIFICATION_ID_PATTERN,
    USER_ID_PATTERN,
    ErrorBody,
    PublishRequest,
    TopicAccepted,
    TopicHistory,
    TopicPresence,
)
from .publish import IdempotencyKey, _errors, _publish, accepted, check_rate, check_topic

router = APIRouter(tags=["topics"], route_class=JsonRoute)

TopicName = Annotated[str, Path(description='`namespace:rest`, or a bare name in the namespace "".')]
UserName = Annotated[str, Path(min_length=1, max_length=256, pattern=USER_ID_PATTERN)]
_TOPIC_ERRORS = {**_errors(), 404: {"model": ErrorBody, "description": "The topic's namespace is not configured."}}


@router.post("/topics/{topic}", status_code=202, response_model=TopicAccepted, responses=_TOPIC_ERRORS)
async def publish_to_topic(
    topic: TopicName,
    body: PublishRequest,
    publisher: PublisherDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Send a message to every member socket of a topic, on every replica; kept in its history."""
    stream = topic_stream(check_topic(runtime, topic))
    check_rate(runtime, publisher)
    return accepted(stream, await _publish(runtime, publisher, stream, body, idempotency_key))


@router.get("/topics/{topic}/presence", response_model=TopicPresence, responses=_TOPIC_ERRORS)
async def topic_presence(topic: TopicName, reader: ReaderDep, runtime: RuntimeDep) -> TopicPresence:
    """The topic's members (distinct users across replicas): their count, and at most 1,000 of
    them, sorted; read at most once per NOTIFY_PRESENCE_CACHE_SECONDS per topic on each replica."""
    users, count = await runtime.member_lists.get(topic_stream(check_topic(runtime, topic)))
    return TopicPresence(topic=topic, count=count, users=users, truncated=count > len(users))


@router.get("/topics/{topic}/history", response_model=TopicHistory, responses=_TOPIC_ERRORS)
async def topic_history(
    topic: TopicName,
    reader: ReaderDep,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=0, le=1000)] = 50,
    before: Annotated[str | None, Query(pattern=NOTIFICATION_ID_PATTERN)] = None,
) -> TopicHistory:
    """The topic's retained messages older than `before`, newest first."""
    frames = await runtime.broker.latest(topic_stream(check_topic(runtime, topic)), before, limit)
    notifications: list[dict[str, Any]] = [orjson.loads(frame) for frame in frames]
    return TopicHistory(topic=topic, notifications=notifications)


@router.delete("/topics/{topic}/members/{user_id:path}", status_code=202, responses=_TOPIC_ERRORS)
async def remove_member(topic: TopicName, user_id: UserName, admin: AdminDep, runtime: RuntimeDep) -> dict[str, str]:
    """Take every socket of the user out of the topic, on every replica (scope `notify:admin`);
    each gets `{"type":"left","topic":T,"reason":"removed"}`."""
    await runtime.broker.send(topic_stream(check_topic(runtime, topic)), control(REMOVE, user_id))
    return {"topic": topic, "user": user_id}


@router.post("/users/{user_id:path}/disconnect", status_code=202, responses=_errors())
async def disconnect_user(user_id: UserName, admin: AdminDep, runtime: RuntimeDep) -> dict[str, str]:
    """Close every socket and SSE stream of the user on every replica with 4403 (scope
    `notify:admin`): logout everywhere, bans. Clients must not reconnect with the same token."""
    await runtime.broker.send(user_stream(user_id), control(DISCONNECT, ""))
    return {"user": user_id}
