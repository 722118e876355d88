"""MemberLists: a topic's member list, read from the broker at most once per period per replica.

A member list is asked for by sockets (`presence` frames) and backends (`GET /topics/{t}/presence`);
a popular topic is asked for by many at once. Each replica keeps the last answer per topic for a
short time, and while a read is under way everyone else who asks waits for that same read instead
of starting their own: the broker's cost of a topic's list is one bounded read per period per
replica, however many ask.
"""

from __future__ import annotations

import asyncio
import time

from ..broker import Broker

MemberList = tuple[list[str], int]

# Topics whose lists are kept at once; beyond it the oldest answers are dropped first.
_MAX_KEPT = 10_000


class MemberLists:
    """Cached, shared reads of topics' member lists (at most `limit` names each)."""

    def __init__(self, broker: Broker, seconds: float, limit: int) -> None:
        self._broker = broker
        self._seconds = seconds
        self._limit = limit
        self._kept: dict[str, tuple[float, MemberList]] = {}  # stream -> (read at, answer)
        self._reading: dict[str, asyncio.Future[MemberList]] = {}

    async def get(self, stream: str) -> MemberList:
        """The topic's members (sorted, at most `limit`) and their count; raises what the broker
        raises (BrokerUnavailable), to everyone who was waiting for that read."""
        kept = self._kept.get(stream)
        if kept is not None and time.monotonic() - kept[0] < self._seconds:
            return kept[1]
        reading = self._reading.get(stream)
        if reading is None:
            reading = self._reading[stream] = asyncio.ensure_future(self._read(stream))
            reading.add_done_callback(_retrieve)
        # Shielded: one asker giving up (a closed socket) does not cancel the read the others wait for.
        return await asyncio.shield(reading)

    def forget(self, stream: str) -> None:
        """Drop the kept answer (this replica's own sockets joined or left the topic)."""
        self._kept.pop(stream, None)

    async def _read(self, stream: str) -> MemberList:
        try:
            answer = await self._broker.members(stream, self._limit)
        finally:
            del self._reading[stream]
        self._kept.pop(stream, None)  # re-inserted last: the dict's order is the answers' age
        self._kept[stream] = (time.monotonic(), answer)
        while len(self._kept) > _MAX_KEPT:
            del self._kept[next(iter(self._kept))]
        return answer


def _retrieve(read: asyncio.Future[MemberList]) -> None:
    """A failed read whose askers all gave up is not an unhandled error: the next ask reads again."""
    if not read.cancelled():
        read.exception()
