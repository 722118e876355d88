"""What /ws and /events share: authenticating a client, registering it, and replaying history."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..broker import frame_id
from ..connection import Closer, Connection
from ..errors import BrokerUnavailable
from ..frames import CloseCode, welcome
from ..ids import IdKey, id_key, parse_id
from ..runtime import Runtime


@dataclass(slots=True)
class Resume:
    """Cursors a reconnecting client sends: the last user and broadcast ids it saw."""

    since: str | None = None
    broadcast_since: str | None = None

    @property
    def requested(self) -> bool:
        return self.since is not None or self.broadcast_since is not None

    def invalid(self) -> str | None:
        for name, value in (("since", self.since), ("broadcast_since", self.broadcast_since)):
            if value is not None and parse_id(value) is None:
                return f"{name} is not a notification id"
        return None


async def open_stream(runtime: Runtime, user_id: str, expires_at: float, resume: Resume, closer: Closer) -> Connection:
    """Register a connection and queue its welcome, then any replay, then live frames; none lost or doubled.

    Raises TooManyConnections."""
    conn = Connection(user_id, expires_at, runtime.settings, runtime.metrics, closer)
    conn.hold()  # live frames wait until the welcome (and any replay) is queued
    await runtime.hub.register(conn)
    recovered: bool | None = None
    replayed: list[str] = []
    floors: list[IdKey | None] = [None, None]
    if resume.requested:
        recovered = resume.invalid() is None
        if recovered:
            recovered, replayed, floors = await _replay(runtime, user_id, resume)
    cursor = runtime.broker.position
    conn.release([welcome(user_id, conn.id, recovered, cursor, expires_at), *replayed], floors[0], floors[1])
    return conn


async def _replay(runtime: Runtime, user_id: str, resume: Resume) -> tuple[bool, list[str], list[IdKey | None]]:
    recovered = True
    frames: list[str] = []
    floors: list[IdKey | None] = [None, None]
    limit = runtime.settings.history_size
    for slot, (target, cursor) in enumerate(((user_id, resume.since), (None, resume.broadcast_since))):
        if cursor is None:
            continue
        try:
            page = await runtime.broker.history(target, cursor, limit)
        except BrokerUnavailable:
            return False, [], [None, None]
        recovered = recovered and page.recovered
        frames.extend(page.frames)
        last = frame_id(page.frames[-1]) if page.frames else None
        floors[slot] = max(id_key(cursor), id_key(last)) if last else id_key(cursor)
    frames.sort(key=lambda frame: id_key(frame_id(frame) or "0-0"))
    return recovered, frames, floors


def schedule_expiry(conn: Connection) -> asyncio.TimerHandle:
    """Close the connection with 4401 when its token expires (unless refreshed before)."""
    delay = max(0.0, conn.expires_at - time.time())
    return asyncio.get_running_loop().call_later(delay, conn.close, CloseCode.UNAUTHORIZED, "token expired")
