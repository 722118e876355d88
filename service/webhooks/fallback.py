"""Fallbacks: what a backend asked to hear about a notification it published to a user.

`offline`: nobody of the user was online when it was published: `notification.undelivered` at once.
`unread`: still retained and unread N seconds later: `notification.unread`, decided then by the one
replica that claims the due check (whichever replica took the publish, and whether it is alive).
A read before then cancels it: the check finds the read marker past the notification and sends
nothing, so a read costs nothing more than it did.
On a single Redis the check is written by the publish itself, in the same step (`check_for`), so the
fallback costs the publish no second round trip; a cluster keeps checks in other slots than the
user's stream, and there it is written after the publish.

A notification with `push` is pushed to every device of the user when its fallback fires, beside
the webhook event (when an endpoint wants it): the same decision, taken once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson

from ..broker import Broker, PublishCheck, Published, ReadState
from ..core.errors import BrokerUnavailable
from ..core.streams import user_stream
from ..core.tasks import cancel_and_wait
from ..outbox.checks import CANCELLED, PENDING, SENT, Checks, DueCheck
from .webhooks import Webhooks

logger = logging.getLogger("service.webhooks")

UNREAD, UNDELIVERED = "notification.unread", "notification.undelivered"
DEFAULT_AFTER_SECONDS = 60
# How often due checks are looked for: a check fires within this of its time.
POLL_SECONDS = 0.5
# A claimed check is another replica's once this has passed without it being settled (its replica died).
LEASE_SECONDS = 30.0
CLAIM_LIMIT = 64


class Pushes(Protocol):
    """What a fired fallback asks of push (service.push.jobs.PushJobs)."""

    async def fan_out(self, user: str, notification_id: str, ts: int, event: str, push: dict[str, Any]) -> None: ...


class Fallbacks:
    """Owned by the app's lifespan, beside the webhooks and the pushes it tells (either may be absent)."""

    def __init__(
        self,
        webhooks: Webhooks | None,
        pushes: Pushes | None,
        checks: Checks,
        broker: Broker,
        retention_seconds: float,
    ) -> None:
        self._webhooks = webhooks
        self._pushes = pushes
        self._checks = checks
        self._broker = broker
        self._retention = retention_seconds
        self._task: asyncio.Task[None] | None = None

    @property
    def checks(self) -> Checks:
        return self._checks

    def _wants(self, event_type: str) -> bool:
        return self._webhooks is not None and self._webhooks.wants(event_type)

    def start(self) -> None:
        if self._wants(UNREAD) or self._pushes is not None:
            self._task = asyncio.create_task(self._check_forever(), name="fallback-checks")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])

    def _unread(self, when: str, push: dict[str, Any] | None) -> bool:
        """Whether a fallback of `when` asks for a check: `unread`, and something to tell when it fires."""
        return when == "unread" and ((push is not None and self._pushes is not None) or self._wants(UNREAD))

    def check_for(self, user: str, when: str, after: int | None, push: dict[str, Any] | None) -> PublishCheck | None:
        """The check a publish with this fallback may write itself (see `published`), or None."""
        if not self._unread(when, push):
            return None
        delay = DEFAULT_AFTER_SECONDS if after is None else after
        # The payload `published` would write: {"user", "id", "event", "data", "ts"[, "push"]}.
        head = '{"user":' + orjson.dumps(user).decode() + ',"id":"'
        tail = (',"push":' + orjson.dumps(push).decode() if push is not None and self._pushes is not None else "") + "}"
        return self._checks.for_publish(user, delay, delay + self._retention, head, tail)

    async def published(
        self,
        user: str,
        when: str,
        after: int | None,
        published: Published,
        event: str,
        data: Any,
        push: dict[str, Any] | None = None,
    ) -> None:
        """Act on a fresh publish's fallback (`push`: what to push when it fires, when push is on);
        its check is scheduled already when the publish wrote it (`published.checked`).
        A queue out of reach is logged, not raised: the notification itself is published."""
        if published.checked:
            return
        told = {"user": user, "id": published.id, "event": event, "data": data, "ts": published.ts}
        pushing = push is not None and self._pushes is not None
        try:
            if when == "offline":
                if published.online == 0 and (pushing or self._wants(UNDELIVERED)):
                    await self._fire(UNDELIVERED, told, push)
                    await self._checks.record(user, published.id, SENT, self._retention)
            elif self._unread(when, push):
                delay = DEFAULT_AFTER_SECONDS if after is None else after
                payload = orjson.dumps({**told, "push": push} if pushing else told).decode()
                await self._checks.schedule(user, published.id, delay, payload, delay + self._retention)
        except BrokerUnavailable as exc:
            logger.warning("fallback of %s not recorded: %s", published.id, exc.message)

    async def _fire(self, event_type: str, told: dict[str, Any], push: dict[str, Any] | None) -> None:
        user = told["user"]
        if self._webhooks is not None and self._webhooks.wants(event_type):
            await self._webhooks.emit(event_type, told, user_stream(user))
        if push is not None and self._pushes is not None:
            await self._pushes.fan_out(user, told["id"], told["ts"], told["event"], push)

    async def state(self, user: str, notification_id: str, read: ReadState) -> str:
        """ "pending", "sent", "cancelled" or "none". A pending check the user has read past (or that
        left history) is cancelled already: it will send nothing when it comes due."""
        found = await self._checks.state(user, notification_id)
        if found is None:
            return "none"
        if found == PENDING and (read.read or not read.retained):
            return CANCELLED
        return found

    async def _check_forever(self) -> None:
        failures = 0
        while True:
            try:
                due = await self._checks.claim(CLAIM_LIMIT)
                failures = 0
            except BrokerUnavailable as exc:
                failures += 1
                if failures == 1:
                    logger.warning("fallback: cannot claim due checks: %s", exc.message)
                await asyncio.sleep(min(5.0, POLL_SECONDS * 2**failures))
                continue
            await asyncio.gather(*(self._decide(check) for check in due))
            if len(due) < CLAIM_LIMIT:
                await asyncio.sleep(POLL_SECONDS)

    async def _decide(self, check: DueCheck) -> None:
        try:
            read = await self._broker.read_state(check.user, check.notification_id)
            if read.retained and not read.read:
                told = orjson.loads(check.payload)
                push = told.pop("push", None)
                await self._fire(UNREAD, told, push)
                await self._checks.settle(check, SENT)
            else:
                await self._checks.settle(check, CANCELLED)
        except BrokerUnavailable as exc:
            # Not settled: its lease runs out and it is decided again.
            logger.warning("fallback of %s not decided: %s", check.notification_id, exc.message)
        except Exception:
            logger.exception("fallback of %s failed unexpectedly", check.notification_id)


def wanted(webhooks: Webhooks | None, push: bool) -> bool:
    """Whether a fallback can ask for anything: an endpoint wants its events, or push is configured."""
    return push or (webhooks is not None and (webhooks.wants(UNREAD) or webhooks.wants(UNDELIVERED)))


def fallbacks_for(
    webhooks: Webhooks | None, pushes: Pushes | None, checks: Checks, broker: Broker, retention_seconds: float
) -> Fallbacks | None:
    """Started fallbacks when an endpoint wants their events or push is configured; None (a
    fallback asks for nothing, and costs nothing) otherwise."""
    if not wanted(webhooks, pushes is not None):
        return None
    fallbacks = Fallbacks(webhooks, pushes, checks, broker, retention_seconds)
    fallbacks.start()
    return fallbacks


def checks_for(broker: Broker) -> Checks:
    """Checks beside the broker: in Redis when the broker is, else in this process."""
    from ..broker.redis.broker import RedisBroker

    if isinstance(broker, RedisBroker):
        from ..outbox.checks_redis import RedisChecks

        return RedisChecks(broker, LEASE_SECONDS)
    from ..outbox.checks_memory import MemoryChecks

    return MemoryChecks()
