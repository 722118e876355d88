"""What a push service answered, reduced to what the sender's caller does next, and the guarded
request every push goes through.

A user chooses the URL a Web Push goes to, so the request is held to what the operator allowed:
only an allowed origin (checked again here, whatever was checked at registration), never a redirect
followed, and at most 64 KB of any answer read.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from ..config.push_options import Origin
from ..egress import Answer, Client, HTTPError
from .devices import allowed

MAX_ANSWER_BYTES = 64 * 1024

Result = Literal["sent", "gone", "retry", "failed"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """sent; gone (the device no longer exists: remove it); retry (after `retry_after` seconds when
    the service said); failed (not retried)."""

    result: Result
    status: int | None
    reason: str = ""
    retry_after: float | None = None


class NotAllowed(Exception):
    """The URL is outside the origins the operator listed."""


async def guarded_post(
    client: Client,
    url: str,
    origins: list[Origin] | None,
    headers: dict[str, str],
    body: bytes,
    seconds: float | None = None,
) -> Answer:
    """POST without following redirects (the client never does), reading at most MAX_ANSWER_BYTES
    of the answer (the rest is dropped with the connection). `origins`: the URL must be on one of
    them (None: an operator's own URL, such as the FCM endpoint). No answer
    within `seconds` (connecting included) is an HTTPError, like a refused connection."""
    if origins is not None and not allowed(url, origins):
        raise NotAllowed("the endpoint is not on an allowed push origin")
    if seconds is None:
        return await client.post(url, headers, body, MAX_ANSWER_BYTES)
    try:
        async with asyncio.timeout(seconds):
            return await client.post(url, headers, body, MAX_ANSWER_BYTES)
    except TimeoutError:
        raise HTTPError(f"no answer within {seconds:g} s") from None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def by_status(answer: Answer) -> Outcome:
    """The classification both kinds share, by HTTP status alone."""
    status = answer.status
    if 200 <= status < 300:
        return Outcome("sent", status)
    if status == 429 or status >= 500:
        return Outcome("retry", status, f"the push service answered {status}", retry_after(answer.headers))
    if 300 <= status < 400:
        return Outcome("failed", status, f"the push service answered a redirect ({status}), not followed")
    return Outcome("failed", status, f"the push service refused it ({status})")
