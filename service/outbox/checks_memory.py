"""MemoryChecks: due checks in this process, for the embedded broker (lost when it stops, as its history is)."""

from __future__ import annotations

import heapq
import itertools
import time

from ..broker import PublishCheck
from .checks import PENDING, DueCheck


class MemoryChecks:
    """One process: a check is claimed by it alone, and popped when claimed."""

    # States beyond this many are pruned of the expired ones.
    PRUNE_AT = 10_000

    def __init__(self) -> None:
        self._due: list[tuple[float, int, str, str]] = []  # (when, order, user, id): a heap
        self._order = itertools.count()
        self._payloads: dict[tuple[str, str], str] = {}
        self._states: dict[tuple[str, str], tuple[str, float]] = {}  # -> (state, kept until)

    async def schedule(self, user: str, notification_id: str, delay: float, payload: str, keep: float) -> None:
        heapq.heappush(self._due, (time.time() + delay, next(self._order), user, notification_id))
        self._payloads[user, notification_id] = payload
        await self.record(user, notification_id, PENDING, keep)

    def for_publish(self, user: str, delay: float, keep: float, head: str, tail: str) -> PublishCheck | None:
        return None  # scheduled apart: nothing to save in this process

    async def record(self, user: str, notification_id: str, state: str, keep: float) -> None:
        now = time.time()
        if len(self._states) >= self.PRUNE_AT:
            self._states = {k: v for k, v in self._states.items() if v[1] > now}
        self._states[user, notification_id] = (state, now + keep)

    async def state(self, user: str, notification_id: str) -> str | None:
        found = self._states.get((user, notification_id))
        return found[0] if found is not None and found[1] > time.time() else None

    async def claim(self, limit: int) -> list[DueCheck]:
        now, claimed = time.time(), []
        while self._due and self._due[0][0] <= now and len(claimed) < limit:
            _, _, user, notification_id = heapq.heappop(self._due)
            payload = self._payloads.pop((user, notification_id), None)
            if payload is not None:
                claimed.append(DueCheck(user, notification_id, payload))
        return claimed

    async def settle(self, check: DueCheck, state: str) -> None:
        found = self._states.get((check.user, check.notification_id))
        if found is not None:
            self._states[check.user, check.notification_id] = (state, found[1])
