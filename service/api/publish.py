"""Publish API for backend services: POST /notify/{user_id}, POST /notify (batch), POST /broadcast."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Body, Header, Path

from .. import logs
from ..auth import Principal
from ..broker import Published
from ..errors import InvalidRequest, PayloadTooLarge, RateLimited, ServiceError
from ..models import (
    USER_ID_PATTERN,
    BatchAccepted,
    BatchItem,
    BatchItemResult,
    ErrorBody,
    PublishAccepted,
    PublishRequest,
)
from ..runtime import Runtime, TokenBucket
from .body import JsonRoute
from .deps import PublisherDep, RuntimeDep

router = APIRouter(tags=["publish"], route_class=JsonRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        401: "Missing, invalid or expired token.",
        403: "The token lacks the `notify:publish` scope.",
        413: "Body over NOTIFY_MAX_PAYLOAD_BYTES.",
        422: "The body or user id breaks the contract.",
        429: "Over NOTIFY_PUBLISH_RATE for this publisher, or NOTIFY_MAX_CONNECTIONS_PER_IP for this address;"
        " see Retry-After.",
        503: "The broker is unreachable (nothing was published), or the replica is at NOTIFY_MAX_CONNECTIONS"
        " (see Retry-After).",
    }.items()
}

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
    body: PublishRequest,
    publisher: PublisherDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> PublishAccepted:
    """Send a notification to every open socket of one user, on every replica."""
    _check_rate(runtime, publisher)
    published = await _publish(runtime, publisher, user_id, body, idempotency_key)
    return PublishAccepted(id=published.id, ts=published.ts, online=published.online, duplicate=published.duplicate)


@router.post("/broadcast", status_code=202, response_model=PublishAccepted, responses=_ERRORS)
async def broadcast(
    body: PublishRequest, publisher: PublisherDep, runtime: RuntimeDep, idempotency_key: IdempotencyKey = None
) -> PublishAccepted:
    """Send a notification to every open socket of every user."""
    _check_rate(runtime, publisher)
    published = await _publish(runtime, publisher, None, body, idempotency_key)
    return PublishAccepted(id=published.id, ts=published.ts, duplicate=published.duplicate)


@router.post("/notify", status_code=200, response_model=BatchAccepted, responses=_ERRORS)
async def notify_batch(
    body: Annotated[list[BatchItem], Body(min_length=1)],
    publisher: PublisherDep,
    runtime: RuntimeDep,
    idempotency_key: IdempotencyKey = None,
) -> BatchAccepted:
    """Send many user notifications in one request; each item gets its own result, in order.

    With an Idempotency-Key, a retried batch answers each item's first result and delivers none twice."""
    if len(body) > runtime.settings.batch_max_items:
        raise InvalidRequest(f"a batch holds at most {runtime.settings.batch_max_items} notifications, got {len(body)}")
    _check_rate(runtime, publisher)
    keys = [f"{idempotency_key}\0{index}" if idempotency_key else None for index in range(len(body))]
    outcomes = await asyncio.gather(
        *(_publish(runtime, publisher, item.user, item, key) for item, key in zip(body, keys, strict=True)),
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


async def _publish(
    runtime: Runtime, publisher: Principal, user_id: str | None, body: PublishRequest, idempotency_key: str | None
) -> Published:
    try:
        data_json = orjson.dumps(body.data).decode()
    except orjson.JSONEncodeError:
        raise InvalidRequest("data must be JSON whose integers fit in 64 bits") from None
    if len(data_json) > runtime.settings.max_payload_bytes:
        raise PayloadTooLarge(f"data is larger than {runtime.settings.max_payload_bytes} bytes once encoded")
    scoped_key = None
    if idempotency_key:
        scoped_key = hashlib.sha256(f"{publisher.user_id}\0{idempotency_key}".encode()).hexdigest()
    started = time.perf_counter()
    published = await runtime.broker.publish(user_id, orjson.dumps(body.event).decode(), data_json, scoped_key)
    runtime.metrics.publish_latency.observe(time.perf_counter() - started)
    logs.notification_id.set(published.id)
    if not published.duplicate:
        (runtime.metrics.published_broadcast if user_id is None else runtime.metrics.published_user).inc()
    return published


def _check_rate(runtime: Runtime, publisher: Principal) -> None:
    rate = runtime.settings.publish_rate
    if rate is None:
        return
    bucket = runtime.publish_buckets.get(publisher.user_id)
    if bucket is None:
        bucket = runtime.publish_buckets[publisher.user_id] = TokenBucket(rate)
    wait = bucket.take()
    if wait:
        raise RateLimited(f"publish rate limit of {rate:g}/s exceeded for {publisher.user_id!r}", retry_after=wait)
