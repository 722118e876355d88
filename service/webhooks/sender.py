"""One delivery attempt: the request signed as Standard Webhooks v1 says, and what its answer means."""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
from standardwebhooks.webhooks import Webhook

from ..config.webhook_options import WebhookEndpoint
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
    """Signs and POSTs events, on a pool of connections per endpoint, as many as its attempts in
    flight: httpcore looks at every connection of a pool (a poll(2) each) to place each request."""

    def __init__(self, endpoints: tuple[WebhookEndpoint, ...], timeout: float, connections: int) -> None:
        self._endpoints = endpoints
        self._signers = [[Webhook(secret.get_secret_value()) for secret in endpoint.secret] for endpoint in endpoints]
        self._timeout = timeout
        self._clients = [
            httpx.AsyncClient(
                timeout=timeout,
                follow_redirects=False,
                limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
                headers={"user-agent": "notify-service-webhooks"},
            )
            for _ in endpoints
        ]

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
            # The whole attempt, answer included, within the deadline (httpx's is per read).
            async with asyncio.timeout(self._timeout):
                client = self._clients[index]
                request = client.build_request("POST", self._endpoints[index].url, content=body, headers=headers)
                response = await client.send(request, stream=True)
                try:
                    answer = await _read_some(response)
                finally:
                    await response.aclose()
        except TimeoutError:
            return Failed(f"no answer within {self._timeout:g}s")
        except httpx.HTTPError as exc:
            return Failed(f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT] or type(exc).__name__)
        status = response.status_code
        if 200 <= status < 300:
            return Delivered()
        error = f"HTTP {status}" + (f": {answer[:_ERROR_TEXT]}" if answer else "")
        if status == 410:
            return Gone(error)
        not_before = _retry_after(response.headers.get("retry-after")) if status in (429, 503) else 0.0
        return Failed(error, not_before)


async def _read_some(response: httpx.Response) -> str:
    """Up to MAX_ANSWER_BYTES of the answer, as text; the rest is never read."""
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= MAX_ANSWER_BYTES:
            break
    return b"".join(chunks)[:MAX_ANSWER_BYTES].decode(errors="replace").strip()


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
