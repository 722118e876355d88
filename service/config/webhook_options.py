"""A webhook endpoint: what each item of NOTIFY_WEBHOOKS says."""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr, field_validator

SECRET_PREFIX = "whsec_"
_EVENT = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*(\.\*)?|\*")


class WebhookEndpoint(BaseModel):
    """One endpoint: where events go, the secrets that sign them, which event types it wants."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    # Standard Webhooks secrets; every request carries one signature per secret, so a receiver
    # keeps verifying while a new secret is rolled out. Never shown: settings may be logged.
    secret: tuple[SecretStr, ...]
    # Exact types or `prefix.*`; None: every type.
    events: tuple[str, ...] | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an http or https URL with a host")
        return value

    @field_validator("secret", mode="before")
    @classmethod
    def _secrets(cls, value: object) -> object:
        secrets = [value] if isinstance(value, str) else value
        if not isinstance(secrets, list | tuple) or not secrets:
            raise ValueError("secret must be a whsec_ secret or a non-empty list of them")
        for secret in secrets:
            # The secret itself never appears in the message: this line goes to the log.
            if not isinstance(secret, str) or not secret.startswith(SECRET_PREFIX):
                raise ValueError("a secret must be a string starting with whsec_")
            try:
                raw = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("a secret must be whsec_ followed by base64") from None
            if not 24 <= len(raw) <= 64:
                raise ValueError(f"a secret must encode 24 to 64 bytes, not {len(raw)}")
        return tuple(secrets)

    @field_validator("events")
    @classmethod
    def _patterns(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if not _EVENT.fullmatch(pattern):
                raise ValueError(f"{pattern!r} is not an event type or a `prefix.*` pattern")
        return value

    def wants(self, event_type: str) -> bool:
        if self.events is None:
            return True
        for pattern in self.events:
            if pattern == "*" or pattern == event_type:
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False
