"""Standard Webhooks secrets: `whsec_` and the base64 of 24 to 64 random bytes.

Checked when settings load, so a secret a receiver could never verify against stops start-up."""

from __future__ import annotations

import base64
import binascii

PREFIX = "whsec_"
MIN_BYTES, MAX_BYTES = 24, 64


def check_secret(value: str, setting: str) -> str:
    """The secret, unchanged, or ValueError naming the setting (never echoing the secret)."""
    if not value.startswith(PREFIX):
        raise ValueError(f"{setting} is not a Standard Webhooks secret: it must start with {PREFIX!r}")
    try:
        raw = base64.b64decode(value[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{setting} is not a Standard Webhooks secret: after {PREFIX!r} must come base64") from None
    if not MIN_BYTES <= len(raw) <= MAX_BYTES:
        raise ValueError(
            f"{setting} holds {len(raw)} bytes; a Standard Webhooks secret is {MIN_BYTES} to {MAX_BYTES} bytes"
        )
    return value
