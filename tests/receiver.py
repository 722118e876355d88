"""A real webhook receiver for tests: an HTTP server on a free loopback port, in a thread, that
verifies every request with the `standardwebhooks` package and answers as the test scripts it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook

from .utils import TIMEOUT


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Received:
    id: str
    at: float  # monotonic
    event: dict[str, Any]
    headers: dict[str, str]


# What to answer a request: status, headers, seconds to wait before answering, and optionally a body.
Answer = tuple[int, dict[str, str], float] | tuple[int, dict[str, str], float, bytes]


class Receiver:
    """Records every verified request; `answer(id, nth)` decides each answer (nth: 1 for the first
    request carrying that webhook-id)."""

    def __init__(self, secret: str, answer: Callable[[str, int], Answer] | None = None) -> None:
        self.secret = secret
        self.answer = answer or (lambda _id, _n: (200, {}, 0.0))
        self.received: list[Received] = []
        self.unverified = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = Webhook(receiver.secret).verify(body, headers)
                except Exception:  # noqa: BLE001 - any failure to verify is counted
                    with receiver._lock:
                        receiver.unverified += 1
                    self._reply(400, {}, 0.0)
                    return
                with receiver._lock:
                    nth = 1 + sum(1 for r in receiver.received if r.id == headers["webhook-id"])
                    receiver.received.append(Received(headers["webhook-id"], time.monotonic(), event, headers))
                self._reply(*receiver.answer(headers["webhook-id"], nth))

            def _reply(self, status: int, headers: dict[str, str], delay: float, body: bytes | None = None) -> None:
                if delay:
                    time.sleep(delay)
                payload = json.dumps({"status": status}).encode() if body is None else body
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def endpoint(self, **extra: Any) -> dict[str, Any]:
        return {"url": self.url, "secret": self.secret, **extra}

    def events(self, event_type: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received if event_type is None or r.event["type"] == event_type]

    async def wait_for(self, check: Callable[[list[Received]], bool], timeout: float = 3 * TIMEOUT) -> list[Received]:
        """Poll until `check` holds for what was received (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = self.events()
            if check(received):
                return received
            await asyncio.sleep(0.05)
        raise AssertionError(f"receiver never saw what was expected; got {[r.event for r in self.events()]}")


@contextlib.contextmanager
def receiving(answer: Callable[[str, int], Answer] | None = None, secret: str | None = None) -> Iterator[Receiver]:
    receiver = Receiver(secret or new_secret(), answer)
    thread = threading.Thread(target=receiver._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver._server.shutdown()
        receiver._server.server_close()
        thread.join(TIMEOUT)
