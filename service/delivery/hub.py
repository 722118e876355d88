"""Hub: this replica's registry of open connections by stream, and local delivery.

A connection is a member of its user's stream and of the broadcast stream from the start, and of
each topic it joins. A stream is subscribed on this replica with its first local member and
released with its last. Messages for the replicas themselves travel on the same channels, marked
with a leading CONTROL character: a signal (to every member but its sender), the removal of a user
from a topic, and the disconnection of a user.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..broker import Broker, StreamRules, frame_id
from ..broker.base import CONTROL
from ..core.errors import TooManyForUser
from ..core.frames import RESYNC, CloseCode, encode, wire_text
from ..core.ids import id_key
from ..core.streams import BROADCAST, topic_of, topic_stream, user_of, user_stream
from ..telemetry.metrics import Metrics
from .connection import Connection

logger = logging.getLogger("service.hub")

SIGNAL, REMOVE, DISCONNECT = "s", "r", "d"


def control(kind: str, argument: str, frame: str = "") -> str:
    """A message for the replicas: `!<kind><argument>\\n<frame>`."""
    return f"{CONTROL}{kind}{argument}\n{frame}"


class Hub:
    """Maps stream -> open connections; subscribes a stream while it has a local member."""

    def __init__(self, broker: Broker, metrics: Metrics, max_per_user: int) -> None:
        self._broker = broker
        self._metrics = metrics
        self._max_per_user = max_per_user
        self._members: dict[str, set[Connection]] = {}
        self._all: set[Connection] = set()
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._sockets: dict[tuple[str, str], int] = {}  # (topic stream, user) -> sockets here

    def __len__(self) -> int:
        return len(self._all)

    @property
    def connections(self) -> set[Connection]:
        return self._all

    def has_room(self, user_id: str) -> bool:
        """Whether the user may open one more socket on this replica."""
        return len(self._members.get(user_stream(user_id), ())) < self._max_per_user

    async def register(self, conn: Connection) -> None:
        """Add a connection; once this returns, every frame published for its user reaches it."""
        if not self.has_room(conn.user_id):
            raise TooManyForUser("too many connections for this user")
        stream = user_stream(conn.user_id)
        self._all.add(conn)
        self._metrics.connections.inc()
        if len(self._members.get(stream, ())) == 0:
            self._metrics.users_online.inc()
        self._broker.set_presence(stream, conn.user_id, len(self._members.get(stream, ())) + 1)
        await self._add(stream, conn)

    async def unregister(self, conn: Connection) -> None:
        stream = user_stream(conn.user_id)
        if conn not in self._members.get(stream, ()):
            return
        for topic in list(conn.topics or ()):
            await self.leave(conn, topic)
        self._all.discard(conn)
        self._metrics.connections.dec()
        await self._remove(stream, conn)
        left = len(self._members.get(stream, ()))
        self._broker.set_presence(stream, conn.user_id, left)
        if not left:
            self._metrics.users_online.dec()

    async def join(self, conn: Connection, topic: str, rules: StreamRules) -> int:
        """Make the connection a member of a topic; answers the topic's distinct members.

        Raises TopicFull or BrokerUnavailable, and then nothing has changed."""
        stream = topic_stream(topic)
        here = self._sockets.get((stream, conn.user_id), 0)
        count = await self._broker.join_presence(stream, conn.user_id, here + 1, rules)
        self._sockets[(stream, conn.user_id)] = self._sockets.get((stream, conn.user_id), 0) + 1
        if conn.topics is None:
            conn.topics = set()
        conn.topics.add(topic)
        await self._add(stream, conn)
        return count

    async def leave(self, conn: Connection, topic: str) -> None:
        if conn.topics is None or topic not in conn.topics:
            return
        conn.topics.discard(topic)
        stream = topic_stream(topic)
        left = self._sockets.pop((stream, conn.user_id), 1) - 1
        if left:
            self._sockets[(stream, conn.user_id)] = left
        await self._remove(stream, conn)
        # Written in the background: a leave must happen locally even while Redis is away.
        self._broker.set_presence(stream, conn.user_id, left)

    async def _add(self, stream: str, conn: Connection) -> None:
        members = self._members.get(stream)
        if members is None:
            members = self._members[stream] = {conn}
            pending = self._subscribing[stream] = asyncio.get_running_loop().create_future()
            try:
                await self._broker.subscribe(stream)
            finally:
                pending.set_result(None)
                if self._subscribing.get(stream) is pending:
                    del self._subscribing[stream]
            return
        members.add(conn)
        if stream in self._subscribing:
            await asyncio.shield(self._subscribing[stream])

    async def _remove(self, stream: str, conn: Connection) -> None:
        members = self._members.get(stream)
        if members is None or conn not in members:
            return
        members.discard(conn)
        if not members:
            del self._members[stream]
            await self._broker.unsubscribe(stream)

    def on_frame(self, stream: str, frame: str) -> None:
        """Deliver one frame from the broker to this replica's sockets: encoded once, queued to each."""
        # A stream that lost its last member here may still have frames in flight: nothing to do.
        targets = self._all if stream == BROADCAST else self._members.get(stream)
        if not targets:
            return
        if frame[0] == CONTROL:
            self._control(stream, frame, targets)
            return
        id_ = frame_id(frame)
        if id_ is not None:
            # The id's first part is the publish time (the frame's `ts`).
            self._metrics.delivery_latency.observe(max(0.0, time.time() - id_key(id_)[0] / 1000))
        wire = wire_text(frame)  # encoded once, written as is to every socket that can take it
        for conn in targets:
            conn.push(stream, frame, wire)
        self._metrics.delivered.inc(len(targets))

    def _control(self, stream: str, message: str, targets: set[Connection]) -> None:
        kind = message[1]
        argument, _, frame = message[2:].partition("\n")
        if kind == SIGNAL:
            wire = wire_text(frame)
            for conn in targets:
                if conn.id != argument:
                    conn.push(stream, frame, wire)
        elif kind == REMOVE and (topic := topic_of(stream)) is not None:
            removed = encode({"type": "left", "topic": topic, "reason": "removed"})
            for conn in [c for c in targets if c.user_id == argument]:
                asyncio.get_running_loop().create_task(self.leave(conn, topic))
                conn.send(removed)
        elif kind == DISCONNECT and user_of(stream) is not None:
            for conn in list(targets):
                conn.close(CloseCode.DISCONNECTED, "disconnected by the server")

    async def on_lost(self) -> None:
        """The broker could not replay what this replica missed (Redis came back empty): every
        local socket is asked to refetch. Replayable gaps are replayed by the broker itself, in id
        order, through `on_frame`."""
        for conn in self._all:
            conn.send(RESYNC)
