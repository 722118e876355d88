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
        self.logger = logging.getLogger("service.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _header(scope, b"x-request-id") or secrets.token_hex(8)
        token = request_id.set(rid[:64])
        nid_token = notification_id.set(None)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid[:64].encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.logger.isEnabledFor(logging.INFO):
                path = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
                extra = {
                    "method": scope["method"],
                    "path": redact(path),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                }
                if (nid := notification_id.get()) is not None:
                    extra["notification_id"] = nid
                self.logger.info("%s %s %d", scope["method"], redact(path), status, extra=extra)
            notification_id.reset(nid_token)
            request_id.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
