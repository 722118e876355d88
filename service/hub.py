"""Hub: this replica's registry of open connections by user, and local delivery."""

from __future__ import annotations

import asyncio
import logging
import time

from .broker import Broker, frame_id
from .connection import Connection
from .frames import RESYNC, wire_text
from .ids import IdKey, id_key
from .metrics import Metrics

logger = logging.getLogger("service.hub")


class TooManyConnections(Exception):
    """The user already has the maximum number of sockets on this replica."""


class Hub:
    """Maps user id -> open connections; subscribes a user's channel while they have one."""

    def __init__(self, broker: Broker, metrics: Metrics, max_per_user: int) -> None:
        self._broker = broker
        self._metrics = metrics
        self._max_per_user = max_per_user
        self._users: dict[str, set[Connection]] = {}
        self._all: set[Connection] = set()
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        # Newest id delivered per user (None: broadcasts), so a replayed gap is never sent twice.
        self._last: dict[str | None, IdKey] = {}

    def __len__(self) -> int:
        return len(self._all)

    @property
    def connections(self) -> set[Connection]:
        return self._all

    def has_room(self, user_id: str) -> bool:
        """Whether the user may open one more socket on this replica."""
        return len(self._users.get(user_id, ())) < self._max_per_user

    async def register(self, conn: Connection) -> None:
        """Add a connection; once this returns, every frame published for its user reaches it."""
        if not self.has_room(conn.user_id):
            raise TooManyConnections(conn.user_id)
        conns = self._users.get(conn.user_id)
        first = conns is None
        if first:
            conns = self._users[conn.user_id] = set()
            self._metrics.users_online.inc()
        conns.add(conn)
        self._all.add(conn)
        self._metrics.connections.inc()
        self._broker.set_presence(conn.user_id, len(conns))
        if first:
            pending = self._subscribing[conn.user_id] = asyncio.get_running_loop().create_future()
            try:
                await self._broker.subscribe(conn.user_id)
            finally:
                pending.set_result(None)
                if self._subscribing.get(conn.user_id) is pending:
                    del self._subscribing[conn.user_id]
        elif conn.user_id in self._subscribing:
            await asyncio.shield(self._subscribing[conn.user_id])

    async def unregister(self, conn: Connection) -> None:
        conns = self._users.get(conn.user_id)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        self._all.discard(conn)
        self._metrics.connections.dec()
        self._broker.set_presence(conn.user_id, len(conns))
        if not conns:
            del self._users[conn.user_id]
            self._last.pop(conn.user_id, None)
            self._metrics.users_online.dec()
            await self._broker.unsubscribe(conn.user_id)

    def on_frame(self, user_id: str | None, frame: str) -> None:
        """Deliver one frame from the broker to this replica's sockets: encoded once, queued to each."""
        # A user who left this replica may still have frames in flight: nothing to deliver, nothing
        # to remember (a stale newest id would drop that user's frames after a reconnect here).
        targets = self._all if user_id is None else self._users.get(user_id)
        if not targets:
            return
        id_ = frame_id(frame)
        if id_ is not None:
            key = id_key(id_)
            last = self._last.get(user_id)
            if last is not None and key <= last:
                self._metrics.dropped.labels("duplicate").inc()
                return
            self._last[user_id] = key
            # The id's first part is the publish time (the frame's `ts`).
            self._metrics.delivery_latency.observe(max(0.0, time.time() - key[0] / 1000))
        wire = wire_text(frame)  # encoded once, written as is to every socket that can take it
        for conn in targets:
            conn.push(frame, wire)
        self._metrics.delivered.inc(len(targets))

    async def on_lost(self) -> None:
        """The broker could not replay what this replica missed (Redis came back empty): every
        local socket is asked to refetch. Replayable gaps are replayed by the broker itself, in id
        order, through `on_frame`."""
        self.on_frame(None, RESYNC)
