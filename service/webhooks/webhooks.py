"""Webhooks: events become one outbox job per endpoint that wants them; jobs are sent and settled."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from ..config.settings import Settings
from ..core.errors import BrokerUnavailable
from ..core.tasks import cancel_and_wait
from ..outbox import Delivered, Dispatcher, Job, Outbox, Outcome, Refused
from ..telemetry.metrics import Metrics
from .sender import Gone, Sender

logger = logging.getLogger("service.webhooks")

# Drops (an endpoint over NOTIFY_WEBHOOK_MAX_PENDING, or the queue unreachable) are logged at most this often.
DROP_LOG_SECONDS = 60.0
# How often the shared state is read back: each endpoint's pending count, and which are disabled.
REFRESH_SECONDS = 1.0
_DESTINATION = "webhook:"


class Webhooks:
    """Owned by the app's lifespan when NOTIFY_WEBHOOKS names an endpoint."""

    def __init__(self, settings: Settings, outbox: Outbox, metrics: Metrics) -> None:
        self._endpoints = settings.webhooks
        self._outbox = outbox
        self._metrics = metrics
        self._sender = Sender(self._endpoints, settings.webhook_timeout_seconds, settings.webhook_endpoint_concurrency)
        self._dispatcher = Dispatcher(
            outbox,
            self._send,
            self._report,
            per_destination=settings.webhook_endpoint_concurrency,
            destinations=len(self._endpoints),
        )
        # Which URL a disable was said of: the outbox keeps it beside why.
        self._fingerprints = [hashlib.sha256(e.url.encode()).hexdigest()[:12] for e in self._endpoints]
        self._targets: dict[str, tuple[int, ...]] = {}  # event type -> the endpoints that want it
        self._disabled: dict[int, str] = {}  # as last read back from the outbox (or set here)
        self._dropped_logged = -DROP_LOG_SECONDS
        self._refresher: asyncio.Task[None] | None = None
        self._emitting: set[asyncio.Task[None]] = set()

    @property
    def endpoints(self) -> int:
        return len(self._endpoints)

    async def start(self) -> None:
        await self._outbox.start()
        # A disabled endpoint stays so, for every replica and across their restarts, until an admin
        # enables it or its URL changes: a replica starting with another URL at that position (a
        # new configuration deployed) enables it. One replica restarting must not call again an
        # endpoint that said 410 to the others.
        with contextlib.suppress(BrokerUnavailable):
            stats = await self._outbox.stats()
            for index in range(len(self._endpoints)):
                found = stats.get(_DESTINATION + str(index))
                if found is not None and found.paused and self._disabled_why(index, found.paused) is None:
                    await self._outbox.resume(_DESTINATION + str(index))
        self._dispatcher.start()
        self._refresher = asyncio.create_task(self._refresh_forever(), name="webhooks-refresh")

    async def stop(self) -> None:
        if self._emitting:  # events decided just before the stop (a leave) are queued first
            await asyncio.wait(self._emitting, timeout=2.0)
        await cancel_and_wait([self._refresher])
        await self._dispatcher.stop()
        await self._sender.aclose()
        await self._outbox.stop()

    # ---- events in

    def wants(self, event_type: str) -> bool:
        return bool(self._targets_of(event_type))

    def _targets_of(self, event_type: str) -> tuple[int, ...]:
        targets = self._targets.get(event_type)
        if targets is None:
            targets = tuple(i for i, endpoint in enumerate(self._endpoints) if endpoint.wants(event_type))
            if len(self._targets) < 1024:  # types are the service's own: a handful
                self._targets[event_type] = targets
        return targets

    async def emit(self, event_type: str, data: dict[str, Any], order_key: str) -> None:
        """Queue the event for every endpoint that wants it; events of one `order_key` (a stream)
        are queued in order. What cannot be queued (the queue unreachable, the endpoint over its
        bound) is counted and logged as dropped, never raised: the event itself already happened."""
        targets = self._targets_of(event_type)
        if not targets:
            return
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        body = orjson.dumps({"type": event_type, "timestamp": stamp, "data": data}).decode()
        payload = f"{event_type}\n{body}"
        # Every endpoint's job at once: each enqueue reaches Redis in the order `emit` was called.
        outcomes = await asyncio.gather(
            *(self._outbox.enqueue(_DESTINATION + str(index), payload, order_key) for index in targets),
            return_exceptions=True,
        )
        for index, queued in zip(targets, outcomes, strict=True):
            endpoint = str(index)
            if isinstance(queued, str):
                self._metrics.webhook_enqueued.labels(event_type, endpoint).inc()
            elif isinstance(queued, BrokerUnavailable):
                self._dropped(event_type, endpoint, f"the queue is unreachable ({queued.message})")
            elif isinstance(queued, BaseException):
                raise queued
            else:
                self._dropped(event_type, endpoint, f"over NOTIFY_WEBHOOK_MAX_PENDING for endpoint {index}")

    def emit_soon(self, event_type: str, data: dict[str, Any], order_key: str) -> None:
        """`emit` from code that may not wait for the queue (a timer's callback)."""
        task = asyncio.get_running_loop().create_task(self.emit(event_type, data, order_key))
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    def _dropped(self, event_type: str, endpoint: str, reason: str) -> None:
        self._metrics.webhook_dropped.labels(event_type, endpoint).inc()
        now = time.monotonic()
        if now - self._dropped_logged >= DROP_LOG_SECONDS:
            self._dropped_logged = now
            logger.warning("webhook events dropped: %s (counted in notify_webhook_events_dropped)", reason)

    # ---- jobs out

    async def _send(self, job: Job) -> Outcome:
        index = int(job.destination.removeprefix(_DESTINATION))
        if index >= len(self._endpoints):
            return Refused(f"no endpoint {index} in NOTIFY_WEBHOOKS any more")
        if index in self._disabled:
            # What this replica knows may be a second old: an admin may just have enabled it elsewhere.
            self._apply(await self._outbox.stats())
            if index in self._disabled:
                return Refused(f"endpoint disabled: {self._disabled[index]}")
        outcome = await self._sender.post(index, job.id, job.payload.partition("\n")[2])
        if isinstance(outcome, Gone):
            await self._disable(index, outcome.error)
        return outcome

    def _report(self, job: Job, what: str, outcome: Outcome) -> None:
        event_type = job.payload.partition("\n")[0]
        endpoint = job.destination.removeprefix(_DESTINATION)
        if what == "delivered":
            self._metrics.webhook_delivered.labels(event_type, endpoint).inc()
            latency = time.time() - job.created_ms / 1000
            self._metrics.webhook_latency.labels(endpoint).observe(max(0.0, latency))
        elif what == "retried":
            self._metrics.webhook_retried.labels(event_type, endpoint).inc()
        else:
            self._metrics.webhook_dead.labels(event_type, endpoint).inc()
            if not isinstance(outcome, Delivered):
                logger.warning("webhook %s to endpoint %s is dead: %s", job.id, endpoint, getattr(outcome, "error", ""))

    async def _disable(self, index: int, why: str) -> None:
        if index not in self._disabled:
            logger.warning(
                "webhook endpoint %d disabled: %s; POST /webhooks/%d/enable turns it back on", index, why, index
            )
        self._disabled[index] = why
        self._metrics.webhook_disabled.labels(str(index)).set(1)
        with contextlib.suppress(BrokerUnavailable):
            await self._outbox.pause(_DESTINATION + str(index), f"{self._fingerprints[index]}|{why}")

    def _disabled_why(self, index: int, paused: str) -> str | None:
        """Why the endpoint is disabled, from what the outbox keeps; None when that was said of
        another URL at this position (or by a version that did not say which)."""
        fingerprint, _, why = paused.partition("|")
        return why if fingerprint == self._fingerprints[index] else None

    async def _refresh_forever(self) -> None:
        while True:
            with contextlib.suppress(BrokerUnavailable):
                self._apply(await self._outbox.stats())
            await asyncio.sleep(REFRESH_SECONDS)

    def _apply(self, stats: dict[str, Any]) -> None:
        for index in range(len(self._endpoints)):
            found = stats.get(_DESTINATION + str(index))
            endpoint = str(index)
            self._metrics.webhook_pending.labels(endpoint).set(found.pending if found else 0)
            why = self._disabled_why(index, found.paused) if found is not None and found.paused else None
            if why is not None:
                self._disabled[index] = why
            else:
                self._disabled.pop(index, None)
            self._metrics.webhook_disabled.labels(endpoint).set(1 if index in self._disabled else 0)

    # ---- admin

    async def status(self) -> list[dict[str, Any]]:
        stats = await self._outbox.stats()
        self._apply(stats)
        out = []
        for index, endpoint in enumerate(self._endpoints):
            found = stats.get(_DESTINATION + str(index))
            out.append(
                {
                    "index": index,
                    "url": _shown(endpoint.url),
                    "events": list(endpoint.events) if endpoint.events is not None else None,
                    "pending": found.pending if found else 0,
                    "delivered": found.delivered if found else 0,
                    "failed": found.failed if found else 0,
                    "dead": found.dead if found else 0,
                    "last_success": _iso(found.last_success_ms) if found else None,
                    "last_error": found.last_error if found else None,
                    "last_error_at": _iso(found.last_error_ms) if found else None,
                    "disabled": self._disabled.get(index),
                }
            )
        return out

    async def dead(self, limit: int) -> list[dict[str, Any]]:
        out = []
        for job in await self._outbox.dead(limit):
            event_type, _, body = job.payload.partition("\n")
            out.append(
                {
                    "id": job.id,
                    "endpoint": int(job.destination.removeprefix(_DESTINATION)),
                    "type": event_type,
                    "attempts": job.attempts,
                    "error": job.error,
                    "died": _iso(job.died_ms),
                    "event": orjson.loads(body),
                }
            )
        return out

    async def replay(self, ids: Sequence[str] | None) -> int:
        return await self._outbox.replay(ids)

    async def enable(self, index: int) -> None:
        await self._outbox.resume(_DESTINATION + str(index))
        self._disabled.pop(index, None)
        self._metrics.webhook_disabled.labels(str(index)).set(0)
        logger.info("webhook endpoint %d enabled", index)


def _shown(url: str) -> str:
    """The URL without a password it may carry."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(":" + parts.password + "@", ":***@", 1)))


def _iso(ms: int | None) -> str | None:
    if not ms:
        return None
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
