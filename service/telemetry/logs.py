"""Structured logs: JSON lines with the request id, and no token ever written out.

The access log (NOTIFY_ACCESS_LOG) has three modes:

- `summary` (the default): a line for every request that failed (status 400 and above), every
  request slower than NOTIFY_ACCESS_LOG_SLOW_SECONDS, and every request that is not a publish; a
  successful publish is only counted, and each NOTIFY_ACCESS_LOG_SUMMARY_SECONDS one summary line
  says how many there were and how long they took (p50, p99, max). Writing a line costs more than
  answering a publish's fast path does: a line for every publish took a fifth of a replica's
  publish throughput.
- `all`: one line for every request.
- `off`: no access lines.

In every mode each response carries `X-Request-ID` (the caller's, or a new one), and every line
written about a request carries it as `request_id`.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import logging
import random
import re
import secrets
import time
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
# Set by the publish route so the request's access line names the notification it created.
notification_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("notification_id", default=None)

_access = logging.getLogger("service.access")
_SECRET = re.compile(r"((?:token|access_token|jwt)=)[^&\s\"']+|(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)

AccessLogMode = Literal["summary", "all", "off"]
ACCESS_LOG_MODES: tuple[AccessLogMode, ...] = ("summary", "all", "off")


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
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)  # figures of a summary line
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
    """Pure ASGI middleware: the request id (X-Request-ID, and in the context of every line logged
    while the request runs), and the request's access line as the mode says (see the module docstring)."""

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


# A new request id: this process's random prefix and a count, 16 hex digits as before. Ids only
# tell requests apart in logs; drawing 8 random bytes each time was a getrandom call per publish.
_RID_PREFIX = secrets.token_hex(4)
_rid_counter = itertools.count(random.getrandbits(32))


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's X-Request-ID (at most 64 characters), or a new one."""
    for key, value in headers:
        if key == b"x-request-id" and value:
            return value.decode("latin-1")[:64]
    return f"{_RID_PREFIX}{next(_rid_counter) & 0xFFFFFFFF:08x}"


def publish_kind(method: str, path: str) -> str | None:
    """What a request publishes ("user", "batch", "broadcast", "topic"), None if it is no publish.
    `path` may carry its query."""
    if method != "POST":
        return None
    if path.startswith("/notify"):
        rest = path[7:8]
        return "user" if rest == "/" else "batch" if rest in ("", "?") else None
    if path.startswith("/broadcast"):
        return "broadcast" if path[10:11] in ("", "?") else None
    if path.startswith("/topics/"):
        return "topic"  # the only POST under /topics
    return None


class PublishSummary:
    """Successful publishes of one period, counted by kind, with their durations (a uniform sample
    of at most SAMPLES of them) for the percentiles; one line when the period ends."""

    SAMPLES = 50_000

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: asyncio.TimerHandle | None = None
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.started = now
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.durations: list[float] = []
        self.longest = 0.0
        self.slow = 0  # logged one by one, counted here too
        self.failed = 0

    def add(self, kind: str, duration: float, now: float) -> None:
        self._tick(now)
        self.count += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if duration > self.longest:
            self.longest = duration
        durations = self.durations
        if len(durations) < self.SAMPLES:
            durations.append(duration)
        else:  # reservoir sampling: every publish of the period is as likely to be kept
            slot = random.randrange(self.count)
            if slot < self.SAMPLES:
                durations[slot] = duration

    def logged(self, failed: bool, now: float) -> None:
        """A publish that got a line of its own (failed, or slow): counted in the summary too."""
        self._tick(now)
        if failed:
            self.failed += 1
        else:
            self.slow += 1

    def _tick(self, now: float) -> None:
        if not (self.count or self.slow or self.failed):
            self._start(now)  # the first publish of a period
        elif now - self.started >= self.seconds:
            self.flush(now)  # the period's timer is late (a busy loop) or gone (its loop closed)
            self._start(now)

    def _start(self, now: float) -> None:
        self.started = now
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(self.seconds, self.flush, context=contextvars.Context())

    def flush(self, now: float | None = None) -> None:
        """Write the period's line (if anything was published in it) and start a new period."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.perf_counter() if now is None else now
        if self.count or self.slow or self.failed:
            self._write(now - self.started)
        self._reset(now)

    def _write(self, window: float) -> None:
        ordered = sorted(self.durations)

        def ms(q: float) -> float:
            if not ordered:
                return 0.0
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

        p50, p99, longest = ms(0.5), ms(0.99), round(self.longest * 1000, 2)
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(self.kinds.items()))
        fields = {
            "publishes": self.count,
            "window_s": round(window, 1),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": longest,
            "by_kind": dict(sorted(self.kinds.items())),
            "slow_logged": self.slow,
            "failed_logged": self.failed,
        }
        # In a context of its own: the line is about no one request, whichever one's task ends the period.
        contextvars.Context().run(
            _access.info,
            "%d publishes answered 2xx in %.1f s (%s): p50 %.2f ms, p99 %.2f ms, max %.2f ms; "
            "logged one by one: %d slow, %d failed",
            self.count,
            window,
            kinds or "none",
            p50,
            p99,
            longest,
            self.slow,
            self.failed,
            extra={"fields": fields},
        )


class AccessPolicy:
    """What the access log writes: the mode and thresholds of NOTIFY_ACCESS_LOG*. One per process,
    as the logging configuration is (`configure_access_log`)."""

    def __init__(
        self, mode: AccessLogMode = "summary", slow_seconds: float = 0.1, summary_seconds: float = 10.0
    ) -> None:
        if mode not in ACCESS_LOG_MODES:
            raise ValueError(f"unknown access log mode {mode!r}")
        self.mode = mode
        self.slow_seconds = slow_seconds
        self.summary = PublishSummary(summary_seconds) if mode == "summary" else None


_policy = AccessPolicy()


def configure_access_log(mode: AccessLogMode, slow_seconds: float, summary_seconds: float) -> None:
    """Set this process's access log policy (the app does, from its settings)."""
    global _policy
    flush_access_summary()
    _policy = AccessPolicy(mode, slow_seconds, summary_seconds)


def flush_access_summary() -> None:
    """Write the summary of the publishes counted so far (at shutdown)."""
    if _policy.summary is not None:
        _policy.summary.flush()


def log_access(method: str, path: str, status: int, started: float) -> None:
    """The access line of one request, naming the notification it created, if any; in the
    `summary` mode a fast successful publish is only counted."""
    policy = _policy
    if policy.mode == "off" or not _access.isEnabledFor(logging.INFO):
        return
    now = time.perf_counter()
    duration = now - started
    summary = policy.summary
    if summary is not None:
        kind = publish_kind(method, path)
        if kind is not None:
            if status < 400 and duration < policy.slow_seconds:
                summary.add(kind, duration, now)
                return
            summary.logged(status >= 400, now)
    path = redact(path)
    extra: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration * 1000, 2),
    }
    if (nid := notification_id.get()) is not None:
        extra["notification_id"] = nid
    _access.info("%s %s %d", method, path, status, extra=extra)
