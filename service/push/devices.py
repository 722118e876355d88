"""A user's push devices: what one is, how a registration is checked, and where devices are kept.

A device is a Web Push subscription (the browser's `PushSubscription.toJSON()`: an endpoint URL on a
push service and the keys its payloads are encrypted to) or an FCM registration token. Devices are
per user: every call names the user, and a store never reads one user's devices for another.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric import ec

from ..config.push_options import Origin
from ..core.errors import InvalidRequest

DEVICE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
# FCM registration tokens are opaque, but made of these characters (`<instance>:APA91b...`).
_FCM_TOKEN = re.compile(r"^[A-Za-z0-9_:-]{32,4096}$")
_MAX_ENDPOINT = 2048

Kind = Literal["webpush", "fcm"]


@dataclass(frozen=True, slots=True)
class Device:
    """One registered device; `registered_at` in ms since the epoch (the cap drops the oldest)."""

    id: str
    kind: Kind
    registered_at: int
    endpoint: str | None = None
    p256dh: str | None = None
    auth: str | None = None
    token: str | None = None

    def to_json(self) -> str:
        return orjson.dumps({k: v for k, v in asdict(self).items() if v is not None}).decode()

    @classmethod
    def from_json(cls, text: str | bytes) -> Device:
        return cls(**orjson.loads(text))

    def view(self) -> dict[str, Any]:
        """What the API shows of a device: never the endpoint's path, keys or token, which are
        capabilities to push to it."""
        origin = None
        if self.endpoint is not None:
            parts = urlsplit(self.endpoint)
            origin = f"{parts.scheme}://{parts.netloc}"
        return {"id": self.id, "kind": self.kind, "origin": origin, "registered_at": self.registered_at}


def b64url_decode(text: str) -> bytes:
    """base64url with or without padding; ValueError for anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def allowed(url: str, origins: list[Origin]) -> bool:
    """Whether a URL is on one of the operator's push origins (scheme, host and port all match)."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    if parts.username is not None or parts.password is not None or not host:
        return False
    return any(origin.matches(parts.scheme, host, port) for origin in origins)


def web_push_device(device_id: str, endpoint: str, p256dh: str, auth: str, origins: list[Origin]) -> Device:
    """A Web Push device, or InvalidRequest saying what is wrong with the subscription."""
    if len(endpoint) > _MAX_ENDPOINT:
        raise InvalidRequest(f"subscription.endpoint is longer than {_MAX_ENDPOINT} characters")
    scheme = urlsplit(endpoint).scheme
    http_allowed = any(origin.scheme == "http" for origin in origins)
    if scheme != "https" and not (scheme == "http" and http_allowed):
        raise InvalidRequest("subscription.endpoint must be an https URL")
    if not allowed(endpoint, origins):
        raise InvalidRequest("subscription.endpoint is not on an allowed push service (NOTIFY_PUSH_ALLOWED_ORIGINS)")
    try:
        point = b64url_decode(p256dh)
    except ValueError:
        raise InvalidRequest("subscription.keys.p256dh is not base64url") from None
    try:
        if len(point) != 65 or point[0] != 4:
            raise ValueError
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise InvalidRequest("subscription.keys.p256dh is not an uncompressed point on P-256") from None
    try:
        secret = b64url_decode(auth)
    except ValueError:
        raise InvalidRequest("subscription.keys.auth is not base64url") from None
    if len(secret) != 16:
        raise InvalidRequest(f"subscription.keys.auth must be 16 bytes, not {len(secret)}")
    return Device(device_id, "webpush", _now_ms(), endpoint=endpoint, p256dh=p256dh, auth=auth)


def fcm_device(device_id: str, token: str) -> Device:
    if not _FCM_TOKEN.match(token):
        raise InvalidRequest("token is not an FCM registration token (32 to 4096 of A-Z a-z 0-9 _ : -)")
    return Device(device_id, "fcm", _now_ms(), token=token)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class DeviceStore(Protocol):
    """Where devices are kept; at most `cap` per user, registering one more drops the least recently
    registered. Raises BrokerUnavailable when the backing store is down."""

    async def put(self, user_id: str, device: Device) -> list[Device]:
        """Register (or re-register) a device; answers those dropped to stay within the cap."""

    async def list(self, user_id: str) -> list[Device]:
        """The user's devices, least recently registered first."""

    async def remove(self, user_id: str, device_id: str, only: Device | None = None) -> Device | None:
        """Forget a device; answers it, or None when the user had none with that id. `only`: remove
        it only if it is still this registration (not one made again since under the same id)."""


class MemoryDevices:
    """The embedded broker's store: in this process, gone with it (as its history is)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._users: dict[str, OrderedDict[str, Device]] = {}

    async def put(self, user_id: str, device: Device) -> list[Device]:
        devices = self._users.setdefault(user_id, OrderedDict())
        devices.pop(device.id, None)
        devices[device.id] = device
        dropped = []
        while len(devices) > self._cap:
            dropped.append(devices.popitem(last=False)[1])
        return dropped

    async def list(self, user_id: str) -> list[Device]:
        return list(self._users.get(user_id, {}).values())

    async def remove(self, user_id: str, device_id: str, only: Device | None = None) -> Device | None:
        devices = self._users.get(user_id)
        if devices is None or (only is not None and devices.get(device_id) != only):
            return None
        removed = devices.pop(device_id, None)
        if devices is not None and not devices:
            del self._users[user_id]
        return removed
