"""What /ws and /events share: authenticating a client, registering it, and replaying history."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from ..auth.tokens import Principal
from ..broker import HistoryPage, frame_id
from ..core.errors import BrokerUnavailable
from ..core.frames import CloseCode, welcome
from ..core.ids import IdKey, id_key, parse_id
from ..core.streams import BROADCAST, user_stream
from ..core.timers import Deadline
from ..delivery.connection import Closer, Connection
from .runtime import Runtime


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


def entitle(conn: Connection, principal: Principal, runtime: Runtime) -> None:
    """What the connection's token (at the start, or its latest `refresh`) lets it do."""
    conn.grants = principal.topics
    # A join hook is told the claims; without one, an idle socket keeps no reference to them.
    conn.claims = principal.claims if runtime.hooks is not None else None


async def open_stream(runtime: Runtime, user_id: str, expires_at: float, resume: Resume, closer: Closer) -> Connection:
    """Register a connection and queue its welcome, then any replay, then live frames; none lost or doubled.

    Raises TooManyForUser."""
    conn = Connection(user_id, expires_at, runtime.settings, runtime.metrics, closer, runtime.timers)
    try:
        await _open(runtime, conn, resume)
    except BaseException:
        # Cancelled (the client left mid-handshake) or failed: nothing of it may stay registered.
        await close_stream(runtime, conn)
        raise
    return conn


async def close_stream(runtime: Runtime, conn: Connection) -> None:
    """Unregister a connection, even from a task being cancelled: the unregistering runs to its end."""
    await asyncio.shield(runtime.hub.unregister(conn))


async def _open(runtime: Runtime, conn: Connection, resume: Resume) -> None:
    user_id = conn.user_id
    own = user_stream(user_id)
    conn.hold(own, BROADCAST)  # live frames wait until the welcome (and any replay) is queued
    await runtime.hub.register(conn)
    recovered: bool | None = None
    replayed: list[str] = []
    floors: dict[str, IdKey] = {}
    if resume.requested:
        recovered = resume.invalid() is None
        if recovered:
            for stream, since in ((own, resume.since), (BROADCAST, resume.broadcast_since)):
                if since is not None:
                    page = await replay(runtime, stream, since, floors)
                    recovered = recovered and page.recovered
                    replayed += page.frames
    # Where each stream the client gave no cursor for stands: it resumes from there next time.
    cursors = (
        runtime.broker.position(own) if resume.since is None else None,
        runtime.broker.position(BROADCAST) if resume.broadcast_since is None else None,
    )
    conn.release([welcome(user_id, conn.id, recovered, cursors, conn.expires_at), *replayed], floors, own, BROADCAST)


async def replay(runtime: Runtime, stream: str, since: str, floors: dict[str, IdKey]) -> HistoryPage:
    """The stream's retained frames after `since`, and in `floors` the newest id they cover; a
    page that says not recovered when the broker cannot be read."""
    try:
        page = await runtime.broker.history(stream, since, runtime.settings.history_size)
    except BrokerUnavailable:
        return HistoryPage([], recovered=False)
    if page.ahead:
        return page  # live frames at or below such a cursor were never seen: none is held back
    last = frame_id(page.frames[-1]) if page.frames else None
    floors[stream] = max(id_key(since), id_key(last)) if last else id_key(since)
    return page


def schedule_expiry(conn: Connection) -> Deadline:
    """Close the connection with 4401 when its token expires (unless refreshed before)."""
    assert conn.timers is not None
    return conn.timers.call_later(conn.expires_at - time.time(), conn, _expire)


def _expire(conn: Connection) -> None:
    conn.close(CloseCode.UNAUTHORIZED, "token expired")
