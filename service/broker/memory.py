"""MemoryBroker: the embedded broker for a single replica; the same contract as RedisBroker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from ..config.settings import Settings
from ..core.errors import NamespaceFull
from ..core.ids import IdKey, id_key, is_ahead, is_recoverable
from ..core.streams import BROADCAST, is_topic, topic_of, user_of, user_stream
from ..core.tasks import cancel_and_wait
from .base import (
    FrameHandler,
    HistoryPage,
    Inbox,
    LostHandler,
    MarkedRead,
    PresenceWatch,
    PublishCheck,
    Published,
    ReadState,
    RulesOf,
    StreamRules,
    Then,
    TopicFull,
    build_frame,
    frame_parts,
    presence_frame,
)

_SWEEP_SECONDS = 60.0


@dataclass(slots=True)
class _Stream:
    entries: deque[tuple[IdKey, str]] = field(default_factory=deque)  # (key, frame)
    max_deleted: IdKey = (0, 0)
    last: IdKey = (0, 0)  # the newest id ever given, kept while the stream lives
    size: int = 100
    ttl_ms: int = 86_400_000


@dataclass(slots=True)
class _Members:
    """A topic's members on this (only) replica: sockets per user, users inside their leave grace,
    and the joins and leaves ('j', 'l') waiting for the next announcement."""

    sockets: dict[str, int] = field(default_factory=dict)
    leaving: dict[str, asyncio.TimerHandle] = field(default_factory=dict)
    changes: dict[str, str] = field(default_factory=dict)
    announcing: asyncio.TimerHandle | None = None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryBroker:
    """Keeps history, read markers, presence and idempotency keys in this process."""

    def __init__(self, settings: Settings, replica_id: str, rules: RulesOf) -> None:
        self.replica_id = replica_id
        self._rules = rules
        self._size = settings.history_size
        self._ttl_ms = settings.history_ttl_seconds * 1000
        self._idem_ttl_ms = settings.idempotency_ttl_seconds * 1000
        self._interval = settings.presence_event_interval_seconds
        self._limit = settings.join_leave_max_members
        self._streams: dict[str, _Stream] = {}
        self._read: dict[str, IdKey] = {}
        self._idempotency: dict[tuple[str, str], tuple[Published, int]] = {}
        self._subscribed: set[str] = {BROADCAST}
        self._online: dict[str, int] = {}  # user stream -> sockets
        self._topics: dict[str, _Members] = {}  # topics, and users' own streams while watched
        # Per namespace with max_topics: its topics holding history -> their last publish (ms).
        self._held: dict[str, dict[str, int]] = {}
        self._watch: PresenceWatch | None = None
        self._user_rules = StreamRules()
        self._on_frame: FrameHandler | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        self._on_frame = on_frame
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweeper")

    async def stop(self) -> None:
        await cancel_and_wait([self._sweeper])
        for members in self._topics.values():
            for timer in members.leaving.values():
                timer.cancel()
            if members.announcing is not None:
                members.announcing.cancel()
        self._on_frame = None

    @property
    def ready(self) -> bool:
        return self._on_frame is not None

    async def ping(self) -> None:
        return None

    def position(self, stream: str) -> str:
        # Before any publish (or long after the last), "now" is a cursor history can still vouch for.
        last = self._streams[stream].last if stream in self._streams else (0, 0)
        return "{}-{}".format(*max(last, (_now_ms() - 1000, 0)))

    async def subscribe(self, stream: str) -> None:
        self._subscribed.add(stream)

    async def unsubscribe(self, stream: str) -> None:
        self._subscribed.discard(stream)

    def set_presence(self, stream: str, user_id: str, sockets: int) -> None:
        if is_topic(stream):
            with contextlib.suppress(TopicFull):
                self._topic_presence(stream, user_id, sockets, self._rules(stream))
        else:
            if sockets:
                self._online[stream] = sockets
            else:
                self._online.pop(stream, None)
            if self._watch is not None:
                self._topic_presence(stream, user_id, sockets, self._user_rules)

    async def record_presence(self, stream: str, user_id: str, sockets: int) -> None:
        self.set_presence(stream, user_id, sockets)

    def watch_presence(self, watch: PresenceWatch, user_grace_ms: int) -> None:
        self._watch = watch
        self._user_rules = StreamRules(grace_ms=user_grace_ms)

    async def join_presence(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> int:
        return self._topic_presence(stream, user_id, sockets, rules)

    def _topic_presence(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> int:
        members = self._topics.setdefault(stream, _Members())
        present = user_id in members.sockets
        if sockets and not present and rules.max_members is not None and len(members.sockets) >= rules.max_members:
            raise TopicFull(stream)
        if sockets:
            back = members.leaving.pop(user_id, None)
            if back is not None:
                back.cancel()  # back within the grace: nobody was told they left
            members.sockets[user_id] = sockets
            if not present and rules.events:
                self._note(stream, members, "j", user_id)
            if not present and self._watch is not None:
                self._watch(stream, "join", user_id, len(members.sockets))
        elif present and user_id not in members.leaving:
            loop = asyncio.get_running_loop()
            members.sockets[user_id] = 0
            members.leaving[user_id] = loop.call_later(rules.grace_ms / 1000, self._left, stream, user_id, rules)
        self._drop_if_empty(stream, members)
        return len(members.sockets)

    def _left(self, stream: str, user_id: str, rules: StreamRules) -> None:
        members = self._topics.get(stream)
        if members is None or members.leaving.pop(user_id, None) is None:
            return
        del members.sockets[user_id]
        if rules.events:
            self._note(stream, members, "l", user_id)
        if self._watch is not None:
            self._watch(stream, "leave", user_id, len(members.sockets))
        self._drop_if_empty(stream, members)

    def _note(self, stream: str, members: _Members, action: str, user_id: str) -> None:
        """As scripts.PRESENCE notes it: a join and a leave within one interval cancel out."""
        if members.changes.get(user_id, action) != action:
            del members.changes[user_id]
        else:
            members.changes[user_id] = action
        if members.announcing is None:
            members.announcing = asyncio.get_running_loop().call_later(self._interval, self._announce, stream)

    def _announce(self, stream: str) -> None:
        members = self._topics.get(stream)
        if members is None:
            return
        members.announcing = None
        changes, members.changes = members.changes, {}
        if changes:
            self._deliver(stream, presence_frame(topic_of(stream) or "", changes, len(members.sockets), self._limit))
        self._drop_if_empty(stream, members)

    def _drop_if_empty(self, stream: str, members: _Members) -> None:
        if not members.sockets and members.announcing is None:
            del self._topics[stream]

    async def members(self, stream: str, limit: int) -> tuple[list[str], int]:
        members = self._topics.get(stream)
        users = sorted(members.sockets) if members else []
        return users[:limit], len(users)

    async def publish(
        self,
        stream: str,
        event_json: str,
        data_json: str,
        idempotency_key: str | None,
        sender: str | None = None,
        check: PublishCheck | None = None,
    ) -> Published:
        # `check` is not taken here: checks in this process cost no round trip to schedule apart.
        return self._publish_now(stream, event_json, data_json, idempotency_key, sender)

    def publish_soon(
        self, stream: str, event_json: str, data_json: str, idempotency_key: str | None, then: Then
    ) -> bool:
        if is_topic(stream):
            return False  # its namespace's budget answers NamespaceFull by raising, as `publish` does
        then(self._publish_now(stream, event_json, data_json, idempotency_key, None))
        return True

    def _publish_now(
        self, stream: str, event_json: str, data_json: str, idempotency_key: str | None, sender: str | None
    ) -> Published:
        now = _now_ms()
        if idempotency_key is not None:
            known = self._idempotency.get((stream, idempotency_key))
            if known is not None and known[1] > now:
                first = known[0]
                return Published(first.id, first.ts, self._count(stream), duplicate=True)
        if is_topic(stream):
            self._admit(stream, now)
        entries = self._streams.get(stream)
        if entries is None:
            size, ttl_ms = self._bounds(stream)
            entries = self._streams[stream] = _Stream(size=size, ttl_ms=ttl_ms)
        key = (max(entries.last[0], now), entries.last[1] + 1)
        id_ = f"{key[0]}-{key[1]}"
        frame = build_frame(id_, event_json, data_json, key[0], frame_parts(stream, sender))
        self._append(entries, key, frame)
        published = Published(id_, key[0], self._count(stream))
        if idempotency_key is not None:
            self._idempotency[(stream, idempotency_key)] = (published, now + self._idem_ttl_ms)
        self._deliver(stream, frame)
        return published

    async def send(self, stream: str, frame: str) -> None:
        self._deliver(stream, frame)

    async def history(self, stream: str, after: str, limit: int) -> HistoryPage:
        after_key = id_key(after)
        entries = self._streams.get(stream)
        now = _now_ms()
        if is_ahead(after_key, entries.last if entries else None, now):
            return HistoryPage([], recovered=False, ahead=True)
        if entries is None:
            return HistoryPage([], is_recoverable(after_key, (0, 0), now, self._bounds(stream)[1]))
        frames = [frame for key, frame in self._fresh(entries, now) if key > after_key][:limit]
        return HistoryPage(frames, is_recoverable(after_key, entries.max_deleted, now, entries.ttl_ms))

    async def latest(self, stream: str, before: str | None, limit: int) -> list[str]:
        entries = self._streams.get(stream)
        kept = self._fresh(entries, _now_ms()) if entries else []
        if before is not None:
            before_key = id_key(before)
            kept = [entry for entry in kept if entry[0] < before_key]
        return [frame for _, frame in reversed(kept[-limit:])] if limit else []

    async def inbox(self, user_id: str, before: str | None, limit: int) -> Inbox:
        return Inbox(await self.latest(user_stream(user_id), before, limit), self._unread(user_id))

    async def mark_read(self, user_id: str, up_to: str) -> MarkedRead:
        stream = user_stream(user_id)
        entries = self._streams.get(stream)
        if entries is None or not entries.entries:
            return MarkedRead(0)
        target = min(id_key(up_to), entries.entries[-1][0])
        if target > self._read.get(user_id, (0, 0)):
            self._read[user_id] = target
            count = self._unread(user_id)
            self._deliver(stream, f'{{"type":"unread","count":{count}}}')
            return MarkedRead(count, f"{target[0]}-{target[1]}")
        return MarkedRead(self._unread(user_id))

    async def read_state(self, user_id: str, notification_id: str) -> ReadState:
        key = id_key(notification_id)
        entries = self._streams.get(user_stream(user_id))
        retained = entries is not None and any(entry[0] == key for entry in self._fresh(entries, _now_ms()))
        return ReadState(read=key <= self._read.get(user_id, (0, 0)), retained=retained)

    def _deliver(self, stream: str, frame: str) -> None:
        if self._on_frame is not None and stream in self._subscribed:
            self._on_frame(stream, frame)

    def _count(self, stream: str) -> int | None:
        if is_topic(stream):
            members = self._topics.get(stream)
            return len(members.sockets) if members else 0
        return self._online.get(stream, 0) if user_of(stream) is not None else None

    def _unread(self, user_id: str) -> int:
        entries = self._streams.get(user_stream(user_id))
        marker = self._read.get(user_id, (0, 0))
        return sum(1 for key, _ in self._fresh(entries, _now_ms()) if key > marker) if entries else 0

    def _admit(self, stream: str, now: int) -> None:
        """Whether the topic may hold history: NamespaceFull when its namespace already has
        `max_topics` others with history younger than the TTL."""
        rules = self._rules(stream)
        if rules.max_topics is None:
            return
        held = self._held.setdefault(rules.namespace, {})
        if stream not in held and len(held) >= rules.max_topics:
            oldest = now - self._bounds(stream)[1]
            for expired in [s for s, last in held.items() if last < oldest]:
                del held[expired]
            if len(held) >= rules.max_topics:
                raise NamespaceFull(rules.namespace, rules.max_topics)
        held[stream] = now

    def _bounds(self, stream: str) -> tuple[int, int]:
        rules = self._rules(stream)
        return rules.history_size or self._size, rules.history_ttl_ms or self._ttl_ms

    def _fresh(self, entries: _Stream, now_ms: int) -> list[tuple[IdKey, str]]:
        """The entries young enough to be served: the age bound holds on every read, not only
        when the next publish trims the stream."""
        oldest = now_ms - entries.ttl_ms
        return [entry for entry in entries.entries if entry[0][0] >= oldest]

    def _append(self, entries: _Stream, key: IdKey, frame: str) -> None:
        entries.entries.append((key, frame))
        entries.last = key
        oldest_kept = key[0] - entries.ttl_ms
        while entries.entries and (len(entries.entries) > entries.size or entries.entries[0][0][0] < oldest_kept):
            entries.max_deleted = entries.entries.popleft()[0]

    async def _sweep_forever(self) -> None:
        """Forget idle streams and stale idempotency keys, as Redis expiry would."""
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = _now_ms()
            for stream in [s for s, e in self._streams.items() if e.last[0] < now - e.ttl_ms]:
                del self._streams[stream]
                user_id = user_of(stream)
                if user_id is not None:
                    self._read.pop(user_id, None)
            for key in [k for k, (_, expires) in self._idempotency.items() if expires <= now]:
                del self._idempotency[key]
