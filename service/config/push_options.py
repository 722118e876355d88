"""Push settings read at start: the VAPID key, the FCM service account, and the push origins.

Each check raises ValueError with the one line that stops start-up; nothing here talks to a network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

# The public push services: Chrome's (FCM's web endpoint), Firefox's, Safari's and Edge's.
DEFAULT_PUSH_ORIGINS = (
    "https://fcm.googleapis.com",
    "https://updates.push.services.mozilla.com",
    "https://web.push.apple.com",
    "https://*.notify.windows.com",
)
DEFAULT_FCM_ENDPOINT = "https://fcm.googleapis.com"
_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
# What google-auth needs of a service account to sign its token request, and FCM to address the project.
_ACCOUNT_FIELDS = ("type", "project_id", "private_key", "client_email", "token_uri")


@dataclass(frozen=True, slots=True)
class Origin:
    """An allowed origin: scheme, host (a leading `*.` matches any subdomain, not the domain itself), port."""

    scheme: str
    host: str
    port: int

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host


def parse_origin(text: str, name: str) -> Origin:
    """`https://host[:port]` or `http://host[:port]` (or `https://*.domain`), nothing after it."""
    parts = urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = (parts.hostname or "").lower()
    if (
        parts.scheme not in ("https", "http")
        or not _HOST.match(host)
        or port == -1
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username
        or parts.password
    ):
        raise ValueError(f"{name}: {text.strip()!r} is not an origin such as https://push.example.com")
    return Origin(parts.scheme, host, port or (443 if parts.scheme == "https" else 80))


def load_vapid_key(pem: str | None, path: str | None) -> ec.EllipticCurvePrivateKey | None:
    """The VAPID signing key from NOTIFY_VAPID_PRIVATE_KEY or NOTIFY_VAPID_PRIVATE_KEY_FILE (not both)."""
    if pem is not None and path is not None:
        raise ValueError("NOTIFY_VAPID_PRIVATE_KEY and NOTIFY_VAPID_PRIVATE_KEY_FILE are both set: set one")
    name = "NOTIFY_VAPID_PRIVATE_KEY"
    if path is not None:
        name = f"NOTIFY_VAPID_PRIVATE_KEY_FILE {path!r}"
        try:
            pem = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{name} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if pem is None:
        return None
    # An environment variable often carries the PEM's line breaks as the two characters \n.
    text = pem.replace("\\n", "\n").strip()
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{name} is not a PEM private key (`notify-service vapid` makes one)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError(f"{name} is not a P-256 key: VAPID signs with ES256")
    return key


def check_vapid_subject(subject: str | None, has_key: bool) -> None:
    if subject is None:
        if has_key:
            raise ValueError("NOTIFY_VAPID_SUBJECT is required with a VAPID key: a mailto: or https: URL")
        return
    if not has_key:
        raise ValueError("NOTIFY_VAPID_SUBJECT is set but no VAPID key is (NOTIFY_VAPID_PRIVATE_KEY)")
    parts = urlsplit(subject)
    if not ((parts.scheme == "mailto" and "@" in parts.path) or (parts.scheme == "https" and parts.hostname)):
        raise ValueError(f"NOTIFY_VAPID_SUBJECT {subject!r} is not a mailto: or https: URL")


def check_fcm_credentials(path: str | None) -> None:
    """A readable service-account JSON with what the token request and the send URL need."""
    if path is None:
        return
    name = f"NOTIFY_FCM_CREDENTIALS_FILE {path!r}"
    try:
        account = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{name} cannot be read: {exc.strerror or exc}") from None
    except ValueError:
        raise ValueError(f"{name} is not JSON (a service-account key file)") from None
    if not isinstance(account, dict) or account.get("type") != "service_account":
        raise ValueError(f"{name} is not a service-account key file (its type is not service_account)")
    missing = [field for field in _ACCOUNT_FIELDS if not isinstance(account.get(field), str) or not account[field]]
    if missing:
        raise ValueError(f"{name} lacks {', '.join(missing)}")
    try:
        serialization.load_pem_private_key(account["private_key"].encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{name}: its private_key is not a PEM private key") from None


def check_fcm_endpoint(endpoint: str) -> str:
    origin = parse_origin(endpoint, "NOTIFY_FCM_ENDPOINT")
    if origin.host.startswith("*."):
        raise ValueError(f"NOTIFY_FCM_ENDPOINT: {endpoint!r} names no single host")
    default_port = 443 if origin.scheme == "https" else 80
    return f"{origin.scheme}://{origin.host}" + ("" if origin.port == default_port else f":{origin.port}")
