"""PublishFastPath: well-formed publishes skip the framework's per-request layers.

`POST /notify/{user}` and `POST /broadcast` are the hot path of every backend. The app hands every
HTTP request here first, ahead of FastAPI's middleware. A request with a valid, cached token and a
valid body within the size limit is published here with the same models and the same `_publish` as
the routes; anything else (no or bad token, a bad, chunked or oversized body, a bad id, a browser's
Origin) goes on to the framework and its route, which answer it with the usual error. Only broker
errors are answered here, since retrying the publish on the slow path would double its deadline.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth import PUBLISH_SCOPE
from ..errors import InvalidToken, ServiceError
from ..ids import is_valid_user_id
from ..limits import replay, send_json
from ..models import PublishRequest
from ..runtime import Runtime
from .publish import _check_rate, _publish


class PublishFastPath:
    """Pure ASGI middleware in front of the app; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/broadcast":
            user_id: str | None = None
        elif path.startswith("/notify/") and is_valid_user_id(path[8:]):
            user_id = path[8:]
        else:
            await self.app(scope, receive, send)
            return
        authorization = idempotency_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"idempotency-key":
                idempotency_key = value
            elif name == b"origin" or (name == b"content-type" and not value.startswith(b"application/json")):
                authorization = None  # browsers get CORS headers and odd bodies get their 422: the full route
                break
        message = await receive()
        body: bytes = message.get("body", b"")
        runtime: Runtime = scope["state"]["runtime"]
        if (
            authorization is None
            or message.get("more_body")
            or len(body) > runtime.settings.max_payload_bytes
            or not authorization.startswith(b"Bearer ")
        ):
            await self.app(scope, replay(message, receive), send)
            return
        try:
            principal = await runtime.verifier.verify(authorization[7:].decode("latin-1").strip())
            request = PublishRequest.model_validate_json(body)
        except (InvalidToken, ValidationError):
            principal = None
        key = idempotency_key.decode("latin-1") if idempotency_key is not None else None
        if principal is None or PUBLISH_SCOPE not in principal.scopes or (key is not None and not 0 < len(key) <= 256):
            await self.app(scope, replay(message, receive), send)
            return
        try:
            _check_rate(runtime, principal)
            published = await _publish(runtime, principal, user_id, request, key or None)
        except ServiceError as exc:
            runtime.metrics.errors.labels(exc.code).inc()
            extra = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
            await send_json(send, exc.status_code, {"error": exc.code, "message": exc.message}, extra)
            return
        answer = {"id": published.id, "ts": published.ts, "online": published.online, "duplicate": published.duplicate}
        await send_json(send, 202, answer)
