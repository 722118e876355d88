"""Structured logs: JSON lines with the request id, and no token ever written out."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Set by the publish route so the request's access line names the notification it created.
notification_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("notification_id", default=None)

_access = logging.getLogger("service.access")
_SECRET = re.compile(r"((?:token|access_token|jwt)=)[^&\s\"']+|(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace token query parameters and bearer credentials with `[redacted]`."""
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "[redacted]", text)


class RedactFilter(logging.Filter):
    """Redacts every record, including uvicorn's own lines that quote the request path."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        for key in ("notification_id", "user", "status", "method", "path", "duration_ms", "replica"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def log_config(level: str, as_json: bool) -> dict[str, Any]:
    """A logging dictConfig for the service and uvicorn's loggers."""
    formatter = {"()": JsonFormatter} if as_json else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "main", "filters": ["redact"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactFilter}},
        "formatters": {"main": formatter},
        "handlers": {"main": handler},
        "loggers": {
            "service": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            "uvicorn": {"handlers": ["main"], "level": level.upper(), "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


class AccessLog:
    """Pure ASGI middleware: one log line per HTTP request, with a request id and a redacted path."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope["headers"])
        token = request_id.set(rid)
        nid_token = notification_id.set(None)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            query = scope["query_string"].decode("latin-1")
            log_access(scope["method"], scope["path"] + ("?" + query if query else ""), status, started)
            notification_id.reset(nid_token)
            request_id.reset(token)


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID (at most 64 characters), or a new one."""
    for key, value in headers:
        if key == b"x-request-id" and value:
            return value.decode("latin-1")[:64]
    return secrets.token_hex(8)


def log_access(method: str, path: str, status: int, started: float) -> None:
    """The access line of one request, naming the notification it created, if any."""
    if not _access.isEnabledFor(logging.INFO):
        return
    path = redact(path)
    extra: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    if (nid := notification_id.get()) is not None:
        extra["notification_id"] = nid
    _access.info("%s %s %d", method, path, status, extra=extra)
