"""The synchronous hooks: a namespace's `join_hook` and `publish_hook`, asked before a join or a
member's publish is done, and what their answers mean.

Each call is a Standard Webhooks v1 request signed with NOTIFY_HOOK_SECRET (by the
`standardwebhooks` library), so a backend verifies it as it verifies webhooks. The backend is
another service that may be slow or down; whatever it does, a call ends within
NOTIFY_HOOK_TIMEOUT_SECONDS, holds at most one of MAX_IN_FLIGHT pooled connections (a call beyond
them is `unavailable` at once rather than queued behind a hung backend), never follows a redirect
and reads at most 64 KB of an answer. Only the frame that asked waits for it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook

from ..config.settings import Settings
from ..core.errors import Forbidden, ServiceError
from ..egress import Client, HTTPError
from ..push.outcome import guarded_post
from ..telemetry.metrics import Metrics

logger = logging.getLogger("service.hooks")

# Hook calls in flight at once on a replica, and the pooled connections they may hold.
MAX_IN_FLIGHT = 256
# A hook that keeps failing is logged at most this often (each failure is counted in the metrics).
_WARN_EVERY_SECONDS = 60.0


class HookRefused(Forbidden):
    """The hook answered 403; `reason` is its answer's `reason`, when it gave a string one. (Before
    an SSE stream starts: answered 403 with the reason in the body.)"""

    def __init__(self, reason: str | None) -> None:
        super().__init__("the backend's hook refused it" + (f": {reason}" if reason else ""))
        self.reason = reason

    def body(self) -> dict[str, str]:
        return {**super().body(), "reason": self.reason} if self.reason is not None else super().body()


class HookUnavailable(ServiceError):
    """No usable answer from the hook: nothing was done; trying again later may work."""

    status_code = 503
    code = "unavailable"


class Hooks:
    """The hook client the lifespan owns: one connection pool, one bound, one signer."""

    def __init__(self, settings: Settings, metrics: Metrics, in_flight: int = MAX_IN_FLIGHT) -> None:
        assert settings.hook_secret is not None  # the settings refuse hooks without one
        self._signer = Webhook(settings.hook_secret.get_secret_value())
        self._timeout = settings.hook_timeout_seconds
        self._metrics = metrics
        self._in_flight = in_flight
        self._slots = asyncio.Semaphore(in_flight)
        self._client = Client(in_flight, user_agent="notify-service-hooks")
        self._warned_at: dict[str, float] = {}

    async def join(self, url: str, user: str, topic: str, claims: dict[str, Any]) -> Any:
        """Whether the user may join: the answer's `info` (None without one), or HookRefused /
        HookUnavailable."""
        answer = await self._call("join", url, {"user": user, "topic": topic, "claims": claims})
        return answer.get("info")

    async def publish(self, url: str, user: str, topic: str, event: str, data: Any) -> str:
        """The data to publish, as JSON: what the member sent, or the answer's `data` instead."""
        answer = await self._call("publish", url, {"user": user, "topic": topic, "event": event, "data": data})
        return orjson.dumps(answer["data"] if "data" in answer else data).decode()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, hook: str, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = await self._ask(url, payload)
        except HookRefused:
            self._metrics.hook_calls.labels(hook, "refused").inc()
            raise
        except HookUnavailable as exc:
            self._metrics.hook_calls.labels(hook, "unavailable").inc()
            now = time.monotonic()
            if now - self._warned_at.get(url, -_WARN_EVERY_SECONDS) >= _WARN_EVERY_SECONDS:
                self._warned_at[url] = now
                # The URL without its query, which may carry a credential of the backend's.
                logger.warning("%s hook %s unavailable: %s", hook, url.partition("?")[0], exc.message)
            raise
        self._metrics.hook_calls.labels(hook, "allowed").inc()
        return answer

    async def _ask(self, url: str, payload: dict[str, Any]) -> dict[str, Any]:
        if self._slots.locked():
            raise HookUnavailable(f"{self._in_flight} hook calls are already waiting; try again")
        body = orjson.dumps(payload)
        now = datetime.datetime.now(datetime.UTC)
        message_id = f"msg_{uuid.uuid4().hex}"
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": self._signer.sign(message_id, now, body),
        }
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    answer = await guarded_post(self._client, url, None, headers, body)
            except TimeoutError:
                raise HookUnavailable(f"the hook did not answer within {self._timeout:g} s") from None
            except HTTPError as exc:
                raise HookUnavailable(f"the hook could not be reached ({exc})") from None
        if answer.status == 403:
            reason = (_object(answer.body) or {}).get("reason")
            raise HookRefused(reason if isinstance(reason, str) else None)
        if answer.status != 200:
            raise HookUnavailable(f"the hook answered {answer.status}")
        if not answer.body.strip():
            return {}
        decoded = _object(answer.body)
        if decoded is None:
            raise HookUnavailable("the hook answered 200 without a JSON object (at most 64 KB)")
        return decoded


def _object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object; None when it is not one (or was cut at 64 KB)."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None
