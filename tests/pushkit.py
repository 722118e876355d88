"""Real parts for push tests: keys, a browser's subscription, a local push service (RFC 8030, VAPID
checked, payload decrypted with http_ece) and a local OAuth token endpoint with an FCM v1 endpoint."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import http_ece
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .utils import TIMEOUT


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def vapid_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_of(pem: str) -> str:
    key = serialization.load_pem_private_key(pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return b64(key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint))


@dataclass
class Subscription:
    """What a browser makes when it subscribes: a P-256 key pair and a 16-byte auth secret."""

    endpoint: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    secret: bytes = field(default_factory=lambda: __import__("os").urandom(16))

    @property
    def p256dh(self) -> str:
        point = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return b64(point)

    @property
    def auth(self) -> str:
        return b64(self.secret)

    def to_json(self) -> dict[str, Any]:
        """As `PushSubscription.toJSON()` gives it."""
        return {"endpoint": self.endpoint, "expirationTime": None, "keys": {"p256dh": self.p256dh, "auth": self.auth}}

    def decrypt(self, body: bytes) -> dict[str, Any]:
        plain = http_ece.decrypt(body, private_key=self.key, auth_secret=self.secret, version="aes128gcm")
        return dict(json.loads(plain))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.monotonic)


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stopped reading (the 64 KB cap) is what some tests want


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 whose POSTs go to `answer(path, headers, body)`."""

    def __init__(self, answer: Callable[[str, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]) -> None:
        owner = self
        self.received: list[Received] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner.received.append(Received(self.path, headers, body))
                try:
                    status, extra, reply = answer(self.path, headers, body)
                except Exception as exc:  # noqa: BLE001 - a failed check is an answer the test then sees
                    status, extra, reply = 400, {}, repr(exc).encode()
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def wait_for(self, count: int) -> list[Received]:
        deadline = time.monotonic() + TIMEOUT
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.received)

    @contextlib.contextmanager
    def running(self) -> Iterator[_Server]:
        self.thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()


class PushService(_Server):
    """RFC 8030's push resource: POST /push/<name> answers `status` (201 by default); each request's
    VAPID JWT is verified as a real push service does, with the key in its `k=`."""

    def __init__(self) -> None:
        self.status: dict[str, tuple[int, dict[str, str], bytes]] = {}
        # Answers given once, before `status` (e.g. a 429 then the default 201): path -> answers left.
        self.first: dict[str, list[tuple[int, dict[str, str], bytes]]] = {}
        # While cleared, requests are held unanswered; once set, the held ones are answered 503.
        self.gate = threading.Event()
        self.gate.set()
        self.accepted: list[Received] = []  # answered 2xx: what the push service took
        self._lock = threading.Lock()
        super().__init__(self._answer)

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if not self.gate.is_set():
            self.gate.wait(4 * TIMEOUT)
            return 503, {"Retry-After": "1"}, b""
        with self._lock:
            answers = self.first.get(path)
            answer = answers.pop(0) if answers else self.status.get(path, (201, {}, b""))
            if 200 <= answer[0] < 300:
                self.accepted.append(Received(path, headers, body))
        return answer

    def endpoint(self, name: str) -> str:
        return f"{self.origin}/push/{name}"

    def verify_vapid(self, request: Received, public_key: str, subject: str) -> dict[str, Any]:
        scheme, _, params = request.headers["authorization"].partition(" ")
        assert scheme == "vapid"
        parts = dict(part.split("=", 1) for part in params.split(","))
        assert parts["k"] == public_key
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(parts["k"]))
        claims = jwt.decode(parts["t"], key, algorithms=["ES256"], audience=self.origin)
        assert claims["sub"] == subject and claims["exp"] <= time.time() + 24 * 3600
        return claims


def service_account(path: Path, token_uri: str, project: str = "proj-1") -> rsa.RSAPrivateKey:
    """A service-account key file as the Firebase console gives it, its token_uri pointed at a test server."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": project,
                "private_key_id": "k1",
                "private_key": pem.decode(),
                "client_email": "notify@proj-1.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return key


class Google(_Server):
    """An OAuth token endpoint (checks the service account's signed assertion) and FCM's v1 send."""

    def __init__(self, account_key: rsa.RSAPrivateKey | None = None) -> None:
        self.account_key = account_key
        self.expires_in = 3600
        self.issued: list[str] = []
        self.fcm_answer: tuple[int, dict[str, str], bytes] = (200, {}, b'{"name":"projects/proj-1/messages/1"}')
        super().__init__(self._answer)

    @property
    def token_uri(self) -> str:
        return f"{self.origin}/token"

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        if path == "/token":
            form = urllib.parse.parse_qs(body.decode())
            assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
            assert self.account_key is not None
            claims = jwt.decode(
                form["assertion"][0],
                self.account_key.public_key(),
                algorithms=["RS256"],
                audience="https://oauth2.googleapis.com/token",  # google-auth names Google's, wherever it posts
            )
            assert claims["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
            token = f"ya29.test-{len(self.issued)}"
            self.issued.append(token)
            reply = {"access_token": token, "expires_in": self.expires_in, "token_type": "Bearer"}
            return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()
        if headers.get("authorization") != f"Bearer {self.issued[-1] if self.issued else None}":
            return 401, {}, b'{"error":{"status":"UNAUTHENTICATED"}}'
        return self.fcm_answer
