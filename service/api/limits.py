"""RequestLimits: refuses oversized bodies and paths with control characters before any routing."""

from __future__ import annotations

import re
from collections.abc import Iterable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Header = tuple[bytes, bytes]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RequestLimits:
    """Pure ASGI middleware: 413 for a body over `limit` bytes (`batch_limit` on the batch route), and
    422 for a path with control characters (routing would otherwise cut a trailing newline off an id)."""

    def __init__(self, app: ASGIApp, limit: int, batch_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.batch_limit = batch_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _CONTROL.search(scope["path"]):
            await _error(send, 422, "invalid_request", "the path contains control characters")
            return
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.batch_limit if scope["path"] == "/notify" else self.limit
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        # Read the body up front (it is bounded), so chunked uploads are held to the limit too.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        first: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replay(first, receive), send)


def replay(first: Message, receive: Receive) -> Receive:
    """A `receive` that gives `first` (a message already read) once, then reads on."""
    delivered = False

    async def replayed() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return first
        return await receive()

    return replayed


async def send_json(send: Send, status: int, payload: dict[str, object], headers: Iterable[Header] = ()) -> None:
    """A complete JSON response, without going through the framework."""
    body = orjson.dumps(payload)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _too_large(send: Send, limit: int) -> None:
    await _error(send, 413, "payload_too_large", f"request body is over {limit} bytes")


async def _error(send: Send, status: int, code: str, message: str) -> None:
    await send_json(send, status, {"error": code, "message": message})
