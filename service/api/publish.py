"""Publish API for backend services: POST /notify/{user_id}, POST /notify (batch), POST /broadcast."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Header, Path

from ..auth.tokens import Principal
from ..broker import Published
from ..core.errors import InvalidRequest, NotFound, PayloadTooLarge, RateLimited, ServiceError
from ..core.streams import BROADCAST, is_topic, topic_stream, user_of, user_stream
from ..core.topics import TopicError
from ..push.webpush import PushTooLarge, check_size
from ..telemetry import logs
from .body import JsonRoute
from .deps import PublisherDep, RuntimeDep
from .models import (
    USER_ID_PATTERN,
    BatchAccepted,
    BatchItem,
    BatchItemResult,
    ErrorBody,
    Fallback,
    NotifyRequest,
    PlainPublish,
    PublishAccepted,
    PublishRequest,
)
from .runtime import Runtime

router = APIRouter(tags=["publish"], route_class=JsonRoute)


def _errors() -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorBody, "description": text}
        for status, text in {
            401: "Missing, invalid or expired token.",
            403: "The token lacks the scope this call needs.",
            413: "Body over NOTIFY_MAX_PAYLOAD_BYTES.",
            422: "The body, user id or topic name breaks the contract.",
            429: "Over NOTIFY_PUBLISH_RATE for this publisher, or NOTIFY_MAX_CONNECTIONS_PER_IP for this address"
            " (see Retry-After); or, publishing to a topic, `namespace_full`: its namespace's `max_topics` other"
            " topics hold history.",
            503: "The broker is unreachable (nothing was published), or the replica is at NOTIFY_MAX_CONNECTIONS"
            " (see Retry-After).",
        }.items()
    }


_ERRORS = _errors()

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=256,
        description="A retry with the same key (per publisher) answers the first result and delivers nothing again.",
    ),
]


@router.post("/notify/{user_id:path}", status_code=202, response_model=PublishAccepted, responses=_ERRORS)
async def notify(
    user_id: Annotated[str, Path(min_length=1, max_length=256, pattern=USER_ID_PATTERN)],
    body: NotifyRequest,
    publisher: PublisherDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    """Send a notification to every open socket of one user, on every replica."""
    check_rate(runtime, publisher)
    stream = user_stream(user_id)
    return accepted(stream, await _publish(runtime, publisher, stream, body, idempotency_key))


@router.post("/broadcast", status_code=202, response_model=PublishAccepted, responses=_ERRORS)
async def broadcast(
    body: PublishRequest, publisher: PublisherDep, runtime: RuntimeDep, idempotency_key: IdempotencyKey = None
) -> dict[str, Any]:
    """Send a notification to every open socket of every user."""
    check_rate(runtime, publisher)
    return accepted(BROADCAST, await _publish(runtime, publisher, BROADCAST, body, idempotency_key))


@router.post("/notify", status_code=200, response_model=BatchAccepted, responses=_ERRORS)
async def notify_batch(
    body: Annotated[list[BatchItem], Body(min_length=1)],
    publisher: PublisherDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> BatchAccepted:
    """Send many notifications (to users or topics) in one request; each item gets its own result, in order.

    With an Idempotency-Key, a retried batch answers each item's first result and delivers none twice."""
    if len(body) > runtime.settings.batch_max_items:
        raise InvalidRequest(f"a batch holds at most {runtime.settings.batch_max_items} notifications, got {len(body)}")
    check_rate(runtime, publisher)
    keys = [f"{idempotency_key}\0{index}" if idempotency_key else None for index in range(len(body))]
    outcomes = await asyncio.gather(
        *(_publish_item(runtime, publisher, item, key) for item, key in zip(body, keys, strict=True)),
        return_exceptions=True,
    )
    results = []
    for outcome in outcomes:
        if isinstance(outcome, Published):
            results.append(
                BatchItemResult(
                    status=202, id=outcome.id, ts=outcome.ts, online=outcome.online, duplicate=outcome.duplicate
                )
            )
        elif isinstance(outcome, ServiceError):
            results.append(BatchItemResult(status=outcome.status_code, error=outcome.code, message=outcome.message))
        else:
            raise outcome
    return BatchAccepted(results=results)


async def _publish_item(runtime: Runtime, publisher: Principal, item: BatchItem, key: str | None) -> Published:
    if item.user is not None:
        return await _publish(runtime, publisher, user_stream(item.user), item, key)
    assert item.topic is not None
    return await _publish(runtime, publisher, topic_stream(check_topic(runtime, item.topic)), item, key)


def check_topic(runtime: Runtime, topic: str) -> str:
    """A topic a backend may publish to: 422 for a malformed name, 404 outside the namespaces."""
    try:
        runtime.topics.options(topic)
    except TopicError as exc:
        raise (NotFound if exc.code == "unknown_namespace" else InvalidRequest)(exc.message) from None
    return topic


async def _publish(
    runtime: Runtime,
    publisher: Principal,
    stream: str,
    body: PublishRequest | PlainPublish,
    idempotency_key: str | None,
) -> Published:
    data_json = encoded_data(runtime, body)
    push = _push_of(runtime, body)
    scoped_key = scoped_idempotency_key(publisher, idempotency_key)
    # A user's fallback: on a single Redis its check is written by the publish itself (`check_for`).
    fallback, fallbacks, user = _fallback_of(body, push), runtime.fallbacks, user_of(stream)
    check = None
    if fallback is not None and fallbacks is not None and user is not None:
        check = fallbacks.check_for(user, fallback.when, fallback.after_seconds, push)
    started = time.perf_counter()
    published = await runtime.broker.publish(
        stream, orjson.dumps(body.event).decode(), data_json, scoped_key, check=check
    )
    count_published(runtime, stream, published, started)
    logs.notification_id.set(published.id)
    if fallback is not None and fallbacks is not None and user is not None and not published.duplicate:
        await fallbacks.published(user, fallback.when, fallback.after_seconds, published, body.event, body.data, push)
    return published


def encoded_data(runtime: Runtime, body: PublishRequest | PlainPublish) -> str:
    """The notification's data as its frame carries it; 422 past 64-bit integers, 413 too large."""
    try:
        data_json = orjson.dumps(body.data).decode()
    except orjson.JSONEncodeError:
        raise InvalidRequest("data must be JSON whose integers fit in 64 bits") from None
    if len(data_json) > runtime.settings.max_payload_bytes:
        raise PayloadTooLarge(f"data is larger than {runtime.settings.max_payload_bytes} bytes once encoded")
    return data_json


def scoped_idempotency_key(publisher: Principal, idempotency_key: str | None) -> str | None:
    """The key as the broker keeps it: one publisher's keys never meet another's."""
    if not idempotency_key:
        return None
    return hashlib.sha256(f"{publisher.user_id}\0{idempotency_key}".encode()).hexdigest()


def count_published(runtime: Runtime, stream: str, published: Published, started: float) -> None:
    """A publish's latency (from `started`, on perf_counter) and, unless a duplicate, its count by kind."""
    metrics = runtime.metrics
    metrics.publish_latency.observe(time.perf_counter() - started)
    if not published.duplicate:
        (
            metrics.published_broadcast
            if stream == BROADCAST
            else metrics.published_topic
            if is_topic(stream)
            else metrics.published_user
        ).inc()


# The size is checked before the notification has its id: with the longest id one can be.
_LONGEST_ID = "9" * 15 + "-" + "9" * 19


def _push_of(runtime: Runtime, body: PublishRequest | PlainPublish) -> dict[str, Any] | None:
    """The publish's push, checked before anything is published (422 when too large once encrypted);
    None without `push`, or with no push configured (then it is ignored)."""
    if not isinstance(body, NotifyRequest) or body.push is None or runtime.pushes is None:
        return None
    push = body.push.model_dump()
    try:
        check_size(runtime.pushes.message(_LONGEST_ID, int(time.time() * 1000), body.event, push))
    except (PushTooLarge, orjson.JSONEncodeError) as exc:
        raise InvalidRequest(f"push: {exc}") from None
    return push


def _fallback_of(body: PublishRequest | PlainPublish, push: dict[str, Any] | None) -> Fallback | None:
    """A user's fallback (`push` alone means `offline`); None without either."""
    if not isinstance(body, NotifyRequest):
        return None
    return body.fallback or (Fallback(when="offline") if push is not None else None)


def accepted(stream: str, published: Published) -> dict[str, Any]:
    """A publish's 202 body, the one construction for the routes and the fast path (`api.fastpath`):
    a topic counts its members, a user their sockets online, a broadcast neither (`online` is null)."""
    counted = ("members", published.online or 0) if is_topic(stream) else ("online", published.online)
    return {"id": published.id, "ts": published.ts, counted[0]: counted[1], "duplicate": published.duplicate}


def check_rate(runtime: Runtime, publisher: Principal) -> None:
    rates = runtime.publish_rate
    if rates is None:
        return
    wait = rates.take(publisher.user_id)
    if wait:
        message = f"publish rate limit of {rates.rate:g}/s exceeded for {publisher.user_id!r}"
        raise RateLimited(message, retry_after=wait)
