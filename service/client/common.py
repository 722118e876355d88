"""What the publisher (service/client/__init__.py), the device client (devices.py) and the listener
(service/client/listener.py and its listener_*.py parts) have in common: their errors, a token source,
the backoff delay and the reading of the server's JSON errors.

It imports none of them, so that each imports it and none imports another: the package re-exports
the listener, which would otherwise import the package back while it is still half loaded.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable
from typing import Any, Self

import httpx

TokenSource = str | Callable[[], str | Awaitable[str]]
"""A token, or a (sync or async) callable that returns a current one."""


class NotifyError(Exception):
    """Base of every error the clients raise."""


class PublishError(NotifyError):
    """The server refused a publish (4xx), or it still failed after every retry.

    ``status`` is the HTTP status (None when no answer came back), ``error`` and ``message`` the
    server's JSON error body (``{"error": ..., "message": ..., "details": ...}``)."""

    def __init__(
        self, status: int | None, error: str, message: str, details: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(f"{status or 'no answer'} {error}: {message}")
        self.status = status
        self.error = error
        self.message = message
        self.details = details


class ListenerError(NotifyError):
    """The listener stopped for a reason that retrying cannot fix (e.g. 1009, a refused handshake)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class Unauthorized(ListenerError):
    """Closed with 4401 (token missing, invalid or expired) and no new token to retry with."""


class Disconnected(Unauthorized):
    """Closed with 4403: the server disconnected the user (logout everywhere, a ban). The listener
    never reconnects with the same token; its cursors (``last_id``, ``last_broadcast_id``,
    ``last_topic_ids``) stay readable, for a new listener with a new token to resume from."""


class TopicRefused(ListenerError):
    """The server refused to join one of the listener's topics (``forbidden``, ``full``,
    ``unknown_namespace``, ...): ``topic`` and the error frame's ``error`` code and ``message``;
    ``reason``: what the backend's join hook gave as its reason for a refusal (else None)."""

    def __init__(self, topic: str, error: str, message: str, reason: str | None = None) -> None:
        super().__init__(f"join {topic!r} refused: {error}: {message}")
        self.topic = topic
        self.error = error
        self.message = message
        self.reason = reason


def _full_jitter(base: float, cap: float, attempt: int) -> float:
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


async def _resolve(source: TokenSource) -> str:
    if isinstance(source, str):
        return source
    value = source()
    if inspect.isawaitable(value):
        value = await value
    return str(value)


def _error_from(response: httpx.Response, kind: type[PublishError] = PublishError) -> PublishError:
    """The server's JSON error as `kind`, or the HTTP status when the body is not one."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return kind(response.status_code, body["error"], str(body.get("message", "")), body.get("details"))
    return kind(response.status_code, "http_error", response.text[:200] or response.reason_phrase)


class _HttpClient:
    """What the publisher and the device client share: a base URL, a token source, and an httpx
    client, owned (and closed) unless the caller passed one in."""

    def __init__(self, base_url: str, token: TokenSource, timeout: float, client: httpx.AsyncClient | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._own_client = client is None
        self._http = client or httpx.AsyncClient(timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_client:
            await self._http.aclose()
