"""Python clients: a publisher for backends and a listener for user-side consumers.

Publishing (scope ``notify:publish``)::

    async with Publisher("http://127.0.0.1:8000", token) as pub:
        accepted = await pub.notify("alice", "order.shipped", {"order": 7})
        await pub.broadcast("maintenance", {"in_minutes": 5})
        results = await pub.notify_many([BatchItem("alice", "a"), BatchItem("bob", "b", [1])])
        await pub.publish_topic("chat:lobby", "message", {"text": "hi"})

``notify``, ``broadcast`` and ``publish_topic`` always send an ``Idempotency-Key`` (one is generated when none is
given) and retry 503s, 502/504s, 429s and network failures with capped exponential backoff and
full jitter, reusing the same key: the server answers a repeated key with the first result, so a
retry never delivers twice. Any other 4xx raises :class:`PublishError` carrying the server's JSON
error at once.

Devices for push (docs/protocol.md, "Push")::

    async with Devices("http://127.0.0.1:8000", user_token) as devices:
        await devices.register_fcm("pixel-7", fcm_registration_token)  # again after FCM rotates it
        print(await devices.list())
        await devices.remove("pixel-7")
    # with a notify:admin token: await admin.user_devices("alice"), await admin.remove_user_device("alice", "pixel-7")

Listening (a user's token)::

    async for notification in listen("ws://127.0.0.1:8000/ws", token_or_callable, topics=["chat:lobby"]):
        print(notification.stream, notification.event, notification.data)

The listener follows docs/protocol.md: it reconnects with exponential backoff and full jitter and
resumes every stream from its own cursor, since ids are ordered only within one stream: ``since``
(the last id of the user's stream), ``broadcast_since`` (the last broadcast id) and, for each
topic it was asked to join, a ``join`` frame with ``since`` (the last id seen in that topic, or
the ``joined`` cursor). Before anything of a stream was seen, the welcome's ``cursor`` /
``broadcast_cursor`` stands in; one stream's id is never used as another's cursor. It drops
duplicates by (stream, id), refetches the inbox when the server says it could not replay
(``recovered: false`` or ``resync``), refreshes the token before it expires when given a token
callable, rotates through a list of URLs on reconnect, stops on 4401 unless the token callable
gives a new token, and stops on 4403 (the server disconnected the user: never reconnect with the
same token).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from .common import (
    Disconnected,
    ListenerError,
    NotifyError,
    PublishError,
    TokenSource,
    TopicRefused,
    Unauthorized,
    _error_from,
    _full_jitter,
    _HttpClient,
    _resolve,
)
from .devices import Device, DeviceError, Devices
from .listener import Listener, listen
from .streams import Notification
from .streams import _key as _key  # defined here once: code importing it from here keeps working

__all__ = [
    "BatchItem",
    "BatchResult",
    "Device",
    "DeviceError",
    "Devices",
    "Disconnected",
    "Listener",
    "ListenerError",
    "Notification",
    "NotifyError",
    "PublishAccepted",
    "PublishError",
    "Publisher",
    "TopicRefused",
    "Unauthorized",
    "listen",
]

logger = logging.getLogger("service.client")

_RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Without an idempotency key only answers that prove nothing was done are retried (a gateway's
# 502/504 may come after the service acted).
_SAFE_RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True, slots=True)
class PublishAccepted:
    """What the server answered: the notification id, publish time (unix ms), for user
    notifications how many sockets of the user were online, for topic messages how many distinct
    members the topic has. ``duplicate`` is True when the idempotency key repeated an earlier
    request (nothing was delivered again)."""

    id: str
    ts: int
    online: int | None = None
    duplicate: bool = False
    idempotency_key: str | None = None
    attempts: int = 1
    members: int | None = None


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One notification of a ``notify_many`` batch."""

    user: str
    event: str
    data: Any = None


@dataclass(frozen=True, slots=True)
class BatchResult:
    """The outcome of one batch item: ``id`` when accepted (status 202), else ``error``."""

    status: int
    id: str | None = None
    ts: int | None = None
    online: int | None = None
    error: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 202


class Publisher(_HttpClient):
    """An async client for the publish API (``POST /notify/{user}``, ``/broadcast``, ``/notify``,
    ``/topics/{topic}``).

    ``token`` is a JWT with the ``notify:publish`` scope, or a callable returning a current one
    (called before every request). ``max_attempts`` bounds the tries of one call; the delay
    before try n+1 is uniform in ``[0, min(backoff_max, backoff_base * 2**n)]``, or the server's
    ``Retry-After`` on 429. Keep the total well under the server's idempotency window
    (``NOTIFY_IDEMPOTENCY_TTL_SECONDS``, 300 s by default)."""

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        *,
        timeout: float = 10.0,
        max_attempts: int = 6,
        backoff_base: float = 0.2,
        backoff_max: float = 5.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        super().__init__(base_url, token, timeout, client)
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max

    async def notify(
        self, user: str, event: str, data: Any = None, *, idempotency_key: str | None = None
    ) -> PublishAccepted:
        """Deliver one notification to every open socket of ``user``; retried safely."""
        return await self._publish(f"/notify/{quote(user, safe='')}", event, data, idempotency_key)

    async def broadcast(self, event: str, data: Any = None, *, idempotency_key: str | None = None) -> PublishAccepted:
        """Deliver one notification to every connected user; retried safely."""
        return await self._publish("/broadcast", event, data, idempotency_key)

    async def publish_topic(
        self, topic: str, event: str, data: Any = None, *, idempotency_key: str | None = None
    ) -> PublishAccepted:
        """Send a message to every member socket of ``topic`` (``POST /topics/{topic}``), kept in
        the topic's history; retried safely. The answer's ``members`` is the topic's distinct
        members. A topic outside the configured namespaces raises :class:`PublishError` 404."""
        return await self._publish(f"/topics/{quote(topic, safe=':@=')}", event, data, idempotency_key)

    async def notify_many(self, items: Iterable[BatchItem | Mapping[str, Any]]) -> list[BatchResult]:
        """Publish a batch (``POST /notify``); one result per item, in order.

        The batch API takes no idempotency key, so only failures that prove nothing was published
        are retried (connection refused, 429, a 503 for the whole request). An item answered 503
        may or may not have been stored: check it, or send it again with ``notify`` and a key."""
        body = [_batch_item(item) for item in items]
        response, _ = await self._send("POST", "/notify", body, None, unsafe_retry=False)
        return [
            BatchResult(**{k: v for k, v in r.items() if k in BatchResult.__dataclass_fields__})
            for r in response.json()["results"]
        ]

    async def _publish(self, path: str, event: str, data: Any, idempotency_key: str | None) -> PublishAccepted:
        key = idempotency_key or uuid.uuid4().hex
        response, attempts = await self._send("POST", path, {"event": event, "data": data}, key, unsafe_retry=True)
        body = response.json()
        return PublishAccepted(
            id=body["id"],
            ts=body["ts"],
            online=body.get("online"),
            duplicate=bool(body.get("duplicate")),
            idempotency_key=key,
            attempts=attempts,
            members=body.get("members"),
        )

    async def _send(
        self, method: str, path: str, body: Any, key: str | None, *, unsafe_retry: bool
    ) -> tuple[httpx.Response, int]:
        """Send with retries. ``unsafe_retry``: the request is idempotent, so a retry after an
        answer that never came (timeout, dropped connection) is safe too."""
        last: PublishError | None = None
        for attempt in range(1, self._max_attempts + 1):
            headers = {"Authorization": f"Bearer {await _resolve(self._token)}"}
            if key is not None:
                headers["Idempotency-Key"] = key
            retry_after: float | None = None
            try:
                response = await self._http.request(method, self.base_url + path, json=body, headers=headers)
            except httpx.ConnectError as exc:  # nothing was sent: always safe to retry
                last = PublishError(None, "connection_error", f"{type(exc).__name__}: {exc}")
            except httpx.TransportError as exc:
                last = PublishError(None, "connection_error", f"{type(exc).__name__}: {exc}")
                if not unsafe_retry:
                    raise last from exc
            else:
                if response.status_code < 400:
                    return response, attempt
                last = _error_from(response)
                if response.status_code not in (_RETRY_STATUSES if unsafe_retry else _SAFE_RETRY_STATUSES):
                    raise last
                retry_after = _retry_after(response)
            if attempt == self._max_attempts:
                break
            delay = _full_jitter(self._backoff_base, self._backoff_max, attempt - 1)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self._backoff_max * 2))
            logger.info("publish %s failed (%s), retry %d in %.2fs", path, last, attempt, delay)
            await asyncio.sleep(delay)
        assert last is not None
        raise last


def _batch_item(item: BatchItem | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(item, BatchItem):
        return {"user": item.user, "event": item.event, "data": item.data}
    return dict(item)


def _retry_after(response: httpx.Response) -> float | None:
    with contextlib.suppress(KeyError, ValueError):
        return max(0.0, float(response.headers["retry-after"]))
    return None
