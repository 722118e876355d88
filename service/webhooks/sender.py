"""One delivery attempt: the request signed as Standard Webhooks v1 says, and what its answer means."""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from ..config.webhook_options import WebhookEndpoint
from ..egress import Client, HTTPError
from ..outbox import Delivered, Failed, Outcome, Refused

# At most this much of an answer is read: a receiver's body is only ever shown as an error.
MAX_ANSWER_BYTES = 64 * 1024
# A Retry-After beyond this is taken as this.
MAX_RETRY_AFTER_SECONDS = 86400.0
_ERROR_TEXT = 200


@dataclass(frozen=True, slots=True)
class Gone(Refused):
    """410: the endpoint asks to hear nothing more."""


class Sender:
    """Signs and POSTs events, each endpoint's on keep-alive connections of its own, as many as its
    attempts in flight."""

    def __init__(self, endpoints: tuple[WebhookEndpoint, ...], timeout: float, connections: int) -> None:
        self._endpoints = endpoints
        self._signers = [[Webhook(secret.get_secret_value()) for secret in endpoint.secret] for endpoint in endpoints]
        self._timeout = timeout
        # One client per endpoint: two endpoints on one origin each keep their own share of connections.
        self._clients = [Client(connections, user_agent="notify-service-webhooks") for _ in endpoints]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def post(self, index: int, message_id: str, body: str) -> Outcome:
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": " ".join(signer.sign(message_id, now, body) for signer in self._signers[index]),
        }
        try:
            # The whole attempt, connecting and the answer included, within the deadline.
            async with asyncio.timeout(self._timeout):
                answer = await self._clients[index].post(
                    self._endpoints[index].url, headers, body.encode(), MAX_ANSWER_BYTES
                )
        except TimeoutError:
            return Failed(f"no answer within {self._timeout:g}s")
        except HTTPError as exc:
            return Failed(str(exc)[:_ERROR_TEXT] or type(exc).__name__)
        status = answer.status
        if 200 <= status < 300:
            return Delivered()
        text = answer.body.decode(errors="replace").strip()
        error = f"HTTP {status}" + (f": {text[:_ERROR_TEXT]}" if text else "")
        if status == 410:
            return Gone(error)
        not_before = _retry_after(answer.header("retry-after")) if status in (429, 503) else 0.0
        return Failed(error, not_before)


def _retry_after(value: str | None) -> float:
    """Seconds a Retry-After asks for (delta seconds or an HTTP date); 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)
