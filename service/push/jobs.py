"""Pushes through the outbox: one job per device, so a device's retries are its own, and a replica
that dies holding a job loses its lease and another sends it (at least once, each device once in
practice: a job is forgotten as soon as its push service took it).

A job names the user and the device id, and carries the message; the device is read again from the
user's own devices when the job is attempted, so a device removed meanwhile gets nothing and one
user's jobs can never reach another's devices. The push state a backend sees in GET
/notifications/{id} is kept beside the fallback's, in the same store of checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict
from typing import Any

import orjson

from ..core.errors import BrokerUnavailable
from ..outbox import Delivered, Dispatcher, Failed, Job, Outbox, Outcome, Refused
from ..outbox.checks import Checks
from ..telemetry.metrics import Metrics
from .push import Push
from .webpush import PushMessage

logger = logging.getLogger("service.push")

# Retries of a push its service could not take now (429, 5xx, unreachable), never sooner than its
# Retry-After; a push is given up when its notification leaves history, whichever comes first.
RETRY_SECONDS = (1.0, 5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0, 86400.0)
MAX_PENDING = 1_000_000


def attempt_seconds(timeout: float) -> float:
    """How long one attempt may take: an FCM token exchange and the push, each within `timeout`.
    A job's lease is this and the outbox's margin (which covers reading the devices), so a replica
    that dies holding jobs delays them by that much: 20 s with the default 5 s timeout."""
    return 2 * timeout


_STATE = "push:"  # the push state's name beside the notification's fallback state
_LAST = "push-last"  # the newest notification pushed to a user's Web Push devices
NONE, PENDING, SENT, FAILED = "none", "pending", "sent", "failed"


class PushJobs:
    """Owned by the app's lifespan when push is configured."""

    def __init__(self, push: Push, outbox: Outbox, checks: Checks, retention_seconds: float, metrics: Metrics) -> None:
        self._push = push
        self._metrics = metrics
        self._outbox = outbox
        self._checks = checks
        self._retention = retention_seconds
        self._dispatcher = Dispatcher(outbox, self._send, lambda job, what, outcome: None)
        self._reading: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._outbox.start()
        self._dispatcher.start()

    async def stop(self) -> None:
        if self._reading:
            await asyncio.wait(self._reading, timeout=2.0)
        await self._dispatcher.stop()
        await self._outbox.stop()

    def message(self, notification_id: str, ts: int, event: str, push: dict[str, Any]) -> PushMessage:
        """The push a notification becomes; it lives as long as the notification stays in history."""
        fields = {k: push.get(k) for k in ("body", "url", "icon", "tag", "data")}
        return PushMessage(notification_id, event, push["title"], ts, int(self._retention), **fields)

    async def fan_out(self, user: str, notification_id: str, ts: int, event: str, push: dict[str, Any]) -> None:
        """Queue the notification's push for every device of the user. Raises BrokerUnavailable."""
        message = self.message(notification_id, ts, event, push)
        devices = await self._push.devices.list(user)
        # Recorded first: a job may be sent (and say so) before the last one is queued.
        await self._record(user, notification_id, PENDING if devices else NONE, len(devices))
        for device in devices:
            await self._enqueue(user, device.id, message)
        if any(device.kind == "webpush" for device in devices):
            await self._checks.record(user, _LAST, notification_id, self._retention)

    def read_moved(self, user: str, up_to: str) -> None:
        """The user's read marker moved: their Web Push devices close what they show up to it, when
        a push was sent to them at or below it (else nothing: a read costs one lookup)."""
        task = asyncio.get_running_loop().create_task(self._close(user, up_to))
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _close(self, user: str, up_to: str) -> None:
        try:
            last = await self._checks.state(user, _LAST)
            if not last or _order(last) > _order(up_to):
                return
            await self._checks.record(user, _LAST, "", self._retention)
            now = int(time.time() * 1000)
            message = PushMessage(up_to, "read", "", now, int(self._retention), tag="read", kind="read")
            for device in await self._push.devices.list(user):
                if device.kind == "webpush":
                    await self._enqueue(user, device.id, message)
        except BrokerUnavailable as exc:
            logger.warning("read push for %s not queued: %s", user, exc.message)

    async def state(self, user: str, notification_id: str) -> dict[str, Any]:
        found = await self._checks.state(user, _STATE + notification_id)
        if not found:
            return {"state": NONE, "devices": 0}
        state, _, devices = found.partition(" ")
        return {"state": state, "devices": int(devices or 0)}

    async def _enqueue(self, user: str, device_id: str, message: PushMessage) -> str | None:
        payload = orjson.dumps({"user": user, "device": device_id, "message": asdict(message)}).decode()
        # The destination is the device: its pending bound and its retries are its own.
        return await self._outbox.enqueue(f"push:{user}\n{device_id}", payload, f"u:{user}")

    async def _record(self, user: str, notification_id: str, state: str, devices: int | None = None) -> None:
        """The notification's push state: `sent` once any device took it, `failed` when one refused
        it and none took it yet (a device that took it later makes it `sent`)."""
        name = _STATE + notification_id
        if devices is None:
            found = await self._checks.state(user, name)
            if not found:
                return
            current, _, count = found.partition(" ")
            if current == SENT or (current == FAILED and state == FAILED):
                return
            devices = int(count or 0)
        await self._checks.record(user, name, f"{state} {devices}", self._retention)

    async def _send(self, job: Job) -> Outcome:
        job_body = orjson.loads(job.payload)
        user, message = job_body["user"], PushMessage(**job_body["message"])
        device = next((d for d in await self._push.devices.list(user) if d.id == job_body["device"]), None)
        if device is None:
            return Delivered()  # removed since: nothing to send
        outcome = await self._push.send(user, device, message)
        notification = message.kind == "notification"
        if outcome.result in ("sent", "gone"):
            if notification and outcome.result == "sent":
                await self._record(user, message.id, SENT)
            return Delivered()
        left = (message.ts + message.ttl * 1000) / 1000 - time.time()  # seconds until it leaves history
        if outcome.result == "retry" and left > 0:
            # A Retry-After beyond the notification's life is taken as that: tried once more, then given up.
            return Failed(outcome.reason, min(outcome.retry_after or 0.0, left))
        if notification:
            await self._record(user, message.id, FAILED)
        if outcome.result == "failed":
            return Refused(outcome.reason)
        self._metrics.pushes.labels(device.kind, "expired", str(outcome.status or "none")).inc()
        logger.info("push to device %s given up: its notification left history", device.id)
        return Refused(f"{outcome.reason}; the notification left history")


def _order(notification_id: str) -> tuple[int, int]:
    ms, _, seq = notification_id.partition("-")
    with contextlib.suppress(ValueError):
        return int(ms), int(seq or 0)
    return (0, 0)
