"""Checks: one-off checks about a user's notification, due at a time, each claimed by one replica.

The outbox sends what is already decided; a check decides later (a `fallback` of `unread`: is the
notification still unread N seconds after it was published?). A check is scheduled with what its
decision needs, becomes due, is leased to the one replica that claims it, and is settled with the
state it ended in ("sent", "cancelled"), which `state` reports until the notification would have
left history anyway. `RedisChecks` keeps them beside the queue, on hash-tagged shards shared by every
replica (a replica that dies holding one loses its lease, and another claims it); `MemoryChecks`
keeps them in this process, for the embedded broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..broker import PublishCheck

PENDING, SENT, CANCELLED = "pending", "sent", "cancelled"


@dataclass(frozen=True, slots=True)
class DueCheck:
    user: str
    notification_id: str
    payload: str


class Checks(Protocol):
    async def schedule(self, user: str, notification_id: str, delay: float, payload: str, keep: float) -> None:
        """Due in `delay` seconds; its state ("pending" until settled) is kept `keep` seconds."""
        ...

    def for_publish(self, user: str, delay: float, keep: float, head: str, tail: str) -> PublishCheck | None:
        """The check `schedule` would write, for the publish of the notification it is about to
        write it in the same step (its id is the publish's to decide); None where that costs no
        round trip to save. Its payload: `head`, the notification's id, event, data and ts, `tail`."""
        ...

    async def record(self, user: str, notification_id: str, state: str, keep: float) -> None:
        """A state decided at once (no check to run), kept `keep` seconds."""
        ...

    async def state(self, user: str, notification_id: str) -> str | None: ...

    async def claim(self, limit: int) -> list[DueCheck]:
        """Up to `limit` due checks, leased to the caller until it settles them."""
        ...

    async def settle(self, check: DueCheck, state: str) -> None: ...
