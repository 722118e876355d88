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
from collections.abc import Coroutine
from typing import Any

from ..broker import Broker, StreamRules, frame_id
from ..broker.base import CONTROL
from ..core.errors import BrokerUnavailable, TooManyForUser
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
        self._subscribing: dict[str, asyncio.Future[bool]] = {}
        self._sockets: dict[tuple[str, str], int] = {}  # (topic stream, user) -> sockets here
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._all)

    @property
    def connections(self) -> set[Connection]:
        return self._all

    def has_room(self, user_id: str) -> bool:
        """Whether the user may open one more socket on this replica."""
        return len(self._members.get(user_stream(user_id), ())) < self._max_per_user

    async def register(self, conn: Connection) -> None:
        """Add a connection; once this returns, every frame published for its user reaches it.

        Raises TooManyForUser or BrokerUnavailable, and then nothing has changed."""
        if not self.has_room(conn.user_id):
            raise TooManyForUser("too many connections for this user")
        stream = user_stream(conn.user_id)
        self._all.add(conn)
        self._metrics.connections.inc()
        if len(self._members.get(stream, ())) == 0:
            self._metrics.users_online.inc()
        recorded = False
        try:
            await self._add(stream, conn)
            sockets = len(self._members[stream])
            if sockets == 1:
                # The first socket here is written before the welcome: a publish made right after
                # it must count the user online (its offline webhook or push hangs on that).
                recorded = True
                await self._broker.record_presence(stream, conn.user_id, sockets)
            else:
                self._broker.set_presence(stream, conn.user_id, sockets)
        except BaseException:
            self._discard(stream, conn)
            self._all.discard(conn)
            self._metrics.connections.dec()
            if recorded:  # cancelled while written: brought back to what is here
                self._broker.set_presence(stream, conn.user_id, len(self._members.get(stream, ())))
            if not self._members.get(stream):
                self._metrics.users_online.dec()
            raise

    async def unregister(self, conn: Connection) -> None:
        stream = user_stream(conn.user_id)
        if conn not in self._members.get(stream, ()):
            return
        for topic in list(conn.topics or ()):
            self._leave_now(conn, topic)
        self._all.discard(conn)
        self._metrics.connections.dec()
        self._discard(stream, conn)
        left = len(self._members.get(stream, ()))
        self._broker.set_presence(stream, conn.user_id, left)
        if not left:
            self._metrics.users_online.dec()

    async def join(self, conn: Connection, topic: str, rules: StreamRules) -> int:
        """Make the connection a member of a topic; answers the topic's distinct members.

        Raises TopicFull or BrokerUnavailable, and then nothing has changed (nor when the join
        is cancelled: a dropped handshake leaves no member behind, here or in the broker)."""
        stream = topic_stream(topic)
        key = (stream, conn.user_id)
        # Our own bookkeeping first, so that undoing a join that failed anywhere below is exact.
        self._sockets[key] = self._sockets.get(key, 0) + 1
        if conn.topics is None:
            conn.topics = set()
        conn.topics.add(topic)
        try:
            count = await self._broker.join_presence(stream, conn.user_id, self._sockets[key], rules)
            await self._add(stream, conn)
        except BaseException:
            self._leave_now(conn, topic)
            raise
        return count

    async def leave(self, conn: Connection, topic: str) -> None:
        self._leave_now(conn, topic)

    def _leave_now(self, conn: Connection, topic: str) -> None:
        """Leave at once, without waiting for anything: it must happen locally even while Redis
        is away (presence is written in the background), and it undoes a join that failed."""
        if conn.topics is None or topic not in conn.topics:
            return
        conn.topics.discard(topic)
        stream = topic_stream(topic)
        left = self._sockets.pop((stream, conn.user_id), 1) - 1
        if left:
            self._sockets[(stream, conn.user_id)] = left
        self._discard(stream, conn)
        self._broker.set_presence(stream, conn.user_id, left)

    async def _add(self, stream: str, conn: Connection) -> None:
        members = self._members.get(stream)
        if members is not None:
            members.add(conn)
            pending = self._subscribing.get(stream)
            if pending is not None and not await asyncio.shield(pending):
                self._discard(stream, conn)
                raise BrokerUnavailable("could not subscribe the stream")
            return
        self._members[stream] = {conn}
        pending = self._subscribing[stream] = asyncio.get_running_loop().create_future()
        subscribed = False
        try:
            await self._broker.subscribe(stream)
            subscribed = True
        except BrokerUnavailable:
            raise
        except Exception as exc:
            raise BrokerUnavailable(f"could not subscribe the stream: {type(exc).__name__}") from exc
        finally:
            if self._subscribing.get(stream) is pending:
                del self._subscribing[stream]
            if not subscribed:
                # Nobody may stay a member of a stream that is not subscribed: the next one to
                # join would take it as subscribed and never hear from it. Those waiting leave too.
                self._members.pop(stream, None)
                self._spawn(self._release(stream))
            pending.set_result(subscribed)

    def _discard(self, stream: str, conn: Connection) -> None:
        members = self._members.get(stream)
        if members is None or conn not in members:
            return
        members.discard(conn)
        if not members:
            del self._members[stream]
            self._spawn(self._release(stream))

    async def _release(self, stream: str) -> None:
        # Checked when the task runs: a member may have come (and subscribed it) since.
        if stream not in self._members and stream not in self._subscribing:
            await self._broker.unsubscribe(stream)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run in the background, kept until done; a failure is logged and counted, never lost."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._metrics.task_failures.inc()
            logger.error("hub background task failed", exc_info=exc)

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
            # Straight to the socket where nothing stands between (`Connection.direct`): most
            # sockets, most of the time; else the connection decides (hold, filter, queue, wait).
            write = conn.direct
            if write is not None:
                write(wire)
            else:
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
                self._leave_now(conn, topic)
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
