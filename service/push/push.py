"""Push: what one app instance owns for push (the device store, the senders, their HTTP client)."""

from __future__ import annotations

import time
from typing import Any, cast

from ..config.settings import Settings
from ..core.errors import InvalidRequest
from ..egress import Client
from ..telemetry.metrics import Metrics
from .devices import Device, DeviceStore, MemoryDevices, fcm_device, web_push_device
from .fcm import FcmSender
from .outcome import Outcome
from .redis_devices import RedisDevices, UserScripts
from .webpush import PushMessage, Vapid, WebPushSender

# Connections kept to each push service's origin (as many pushes to it at once).
CONNECTIONS = 64


class Push:
    """Devices and senders for whichever of Web Push and FCM the settings configure."""

    def __init__(self, settings: Settings, broker: Any, metrics: Metrics) -> None:
        self._metrics = metrics
        self.timeout_seconds = settings.push_timeout_seconds
        key = settings.vapid_key()
        self.vapid = Vapid(key, settings.vapid_subject or "") if key is not None else None
        self.origins = settings.push_allowed_origins
        self.devices: DeviceStore = (
            MemoryDevices(settings.max_devices_per_user)
            if settings.redis_url is None
            else RedisDevices(cast(UserScripts, broker), settings.max_devices_per_user)
        )
        # No redirects, ever; no proxy, so every request goes where its URL says.
        self._client = Client(CONNECTIONS)
        self._webpush = (
            WebPushSender(
                self.vapid,
                self.origins,
                self._client,
                settings.push_timeout_seconds,
                metrics.push_encrypt_latency.observe,
            )
            if self.vapid is not None
            else None
        )
        self._fcm = (
            FcmSender(settings.fcm_credentials_file, settings.fcm_endpoint, self._client, settings.push_timeout_seconds)
            if settings.fcm_credentials_file is not None
            else None
        )

    def device(self, device_id: str, kind: str, fields: dict[str, str]) -> Device:
        """A registration checked against what is configured; InvalidRequest says what is wrong."""
        if kind == "webpush":
            if self._webpush is None:
                raise InvalidRequest("Web Push is not configured on this service (no VAPID key)")
            return web_push_device(device_id, fields["endpoint"], fields["p256dh"], fields["auth"], self.origins)
        if self._fcm is None:
            raise InvalidRequest("FCM is not configured on this service (no NOTIFY_FCM_CREDENTIALS_FILE)")
        return fcm_device(device_id, fields["token"])

    async def register(self, user_id: str, device: Device) -> None:
        """Keep a user's device; beyond the cap the least recently registered goes."""
        dropped = await self.devices.put(user_id, device)
        self._metrics.push_devices.labels(device.kind, "registered").inc()
        for old in dropped:
            self._metrics.push_devices.labels(old.kind, "dropped").inc()

    async def remove(self, user_id: str, device_id: str) -> None:
        removed = await self.devices.remove(user_id, device_id)
        if removed is not None:
            self._metrics.push_devices.labels(removed.kind, "removed").inc()

    async def send(self, user_id: str, device: Device, message: PushMessage) -> Outcome:
        """Deliver one message to one of the user's devices. A device its push service says is gone
        is removed here, unless it was registered again meanwhile; the caller retries on `retry`."""
        sender = self._webpush if device.kind == "webpush" else self._fcm
        if sender is None:
            return Outcome("failed", None, f"{device.kind} is no longer configured")
        started = time.perf_counter()
        outcome = await sender.send(device, message)
        self._metrics.push_send_latency.observe(time.perf_counter() - started)
        result = "retried" if outcome.result == "retry" else outcome.result
        self._metrics.pushes.labels(device.kind, result, str(outcome.status or "none")).inc()
        if outcome.result == "gone" and await self.devices.remove(user_id, device.id, only=device) is not None:
            self._metrics.push_devices.labels(device.kind, "gone").inc()
        return outcome

    async def aclose(self) -> None:
        if self._fcm is not None:
            await self._fcm.aclose()
        await self._client.aclose()


def create_push(settings: Settings, broker: Any, metrics: Metrics) -> Push | None:
    """None when neither Web Push nor FCM is configured: the push API then answers 404."""
    if settings.vapid_key() is None and settings.fcm_credentials_file is None:
        return None
    return Push(settings, broker, metrics)
