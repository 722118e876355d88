"""Web Push: RFC 8030 delivery, VAPID (RFC 8292) and aes128gcm payload encryption (RFC 8291).

The encryption is `http_ece`'s and the JWT `py_vapid`'s; this module only assembles the request and
reads the answer.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import http_ece
import orjson
import py_vapid
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..config.push_options import Origin
from ..egress import Client, HTTPError
from .devices import Device, b64url_decode
from .outcome import NotAllowed, Outcome, by_status, guarded_post

logger = logging.getLogger("service.push")

# What a push service must accept (RFC 8291 section 4): larger bodies are refused before sending.
MAX_ENCRYPTED_BYTES = 4096
# aes128gcm's header with a P-256 key id (salt 16, record size 4, id length 1, key 65), the padding
# delimiter and the AEAD tag: what encryption adds to a one-record payload.
_OVERHEAD = 86 + 1 + 16
_JWT_LIFETIME = 12 * 3600
_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One notification as a push: what the device shows, and how long the push service keeps it."""

    id: str
    event: str
    title: str
    ts: int
    ttl: int
    body: str | None = None
    url: str | None = None
    icon: str | None = None
    tag: str | None = None
    data: Any = None
    # "read": not a notification but the user's read marker, `{"type":"read","up_to":id}` (the
    # service worker closes what it shows up to it).
    kind: str = "notification"

    def payload(self) -> bytes:
        if self.kind == "read":
            return orjson.dumps({"type": "read", "up_to": self.id})
        return orjson.dumps(
            {
                "id": self.id,
                "event": self.event,
                "title": self.title,
                "body": self.body,
                "url": self.url,
                "icon": self.icon,
                "tag": self.tag,
                "data": self.data,
                "ts": self.ts,
            }
        )


class PushTooLarge(ValueError):
    """The payload would be over MAX_ENCRYPTED_BYTES once encrypted."""


def encrypted_size(payload: bytes) -> int:
    return len(payload) + _OVERHEAD


def check_size(message: PushMessage) -> None:
    size = encrypted_size(message.payload())
    if size > MAX_ENCRYPTED_BYTES:
        raise PushTooLarge(f"the push would be {size} bytes encrypted, over {MAX_ENCRYPTED_BYTES}")


def topic(tag: str) -> str:
    """The Topic header for a tag (RFC 8030: at most 32 base64url characters): the tag itself
    when it fits, else a digest of it, so that the same tag always replaces the same push."""
    if _TOPIC.match(tag):
        return tag
    return base64.urlsafe_b64encode(hashlib.sha256(tag.encode()).digest()).decode()[:32]


class Vapid:
    """The service's VAPID identity: its public key for browsers, a signed JWT per push origin."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, subject: str) -> None:
        self._vapid = py_vapid.Vapid02(private_key=key)
        self._subject = subject
        point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        self.public_key = base64.urlsafe_b64encode(point).rstrip(b"=").decode()
        self._signed: dict[str, tuple[float, str]] = {}  # audience -> (expiry, Authorization)

    def authorization(self, endpoint: str) -> str:
        """`vapid t=<JWT>,k=<public key>` for the endpoint's origin; one signature per origin,
        reused until an hour before it expires."""
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        cached = self._signed.get(audience)
        if cached is not None and cached[0] - 3600 > now:
            return cached[1]
        expiry = int(now) + _JWT_LIFETIME
        header = self._vapid.sign({"aud": audience, "exp": expiry, "sub": self._subject})["Authorization"]
        if len(self._signed) > 64:
            self._signed.clear()  # a handful of push services in practice: never let it grow unbounded
        self._signed[audience] = (expiry, header)
        return header


def encrypt(payload: bytes, p256dh: str, auth: str) -> bytes:
    """aes128gcm to the subscription's keys, from a fresh ephemeral key and salt."""
    body = http_ece.encrypt(
        payload,
        salt=os.urandom(16),
        private_key=ec.generate_private_key(ec.SECP256R1()),
        dh=b64url_decode(p256dh),
        auth_secret=b64url_decode(auth),
        version="aes128gcm",
    )
    if len(body) > MAX_ENCRYPTED_BYTES:
        raise PushTooLarge(f"the push is {len(body)} bytes encrypted, over {MAX_ENCRYPTED_BYTES}")
    return bytes(body)


class WebPushSender:
    """Sends one message to one Web Push device and says what came of it."""

    def __init__(
        self,
        vapid: Vapid,
        origins: list[Origin],
        client: Client,
        timeout: float,
        timed: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self._vapid = vapid
        self._origins = origins
        self._client = client
        self._timeout = timeout
        self._timed = timed  # told how long each encryption took

    async def send(self, device: Device, message: PushMessage) -> Outcome:
        assert device.kind == "webpush" and device.endpoint and device.p256dh and device.auth
        started = time.perf_counter()
        body = encrypt(message.payload(), device.p256dh, device.auth)
        self._timed(time.perf_counter() - started)
        headers = {
            "TTL": str(max(0, message.ttl)),
            "Urgency": "normal",
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self._vapid.authorization(device.endpoint),
        }
        if message.tag:
            headers["Topic"] = topic(message.tag)
        try:
            answer = await guarded_post(self._client, device.endpoint, self._origins, headers, body, self._timeout)
        except NotAllowed as exc:
            outcome = Outcome("failed", None, str(exc))
        except HTTPError as exc:
            outcome = Outcome("retry", None, f"the push service could not be reached: {exc}")
        else:
            outcome = by_status(answer)
            if answer.status in (404, 410):
                outcome = Outcome("gone", answer.status, "the subscription no longer exists")
        if outcome.result != "sent":
            # The device id only: the endpoint URL is a capability to push to the user.
            logger.info("web push to device %s: %s (%s)", device.id, outcome.result, outcome.reason)
        return outcome
