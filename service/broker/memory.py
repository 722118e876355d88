"""MemoryBroker: the embedded broker for a single replica; the same contract as RedisBroker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field

from ..ids import IdKey, id_key, is_recoverable
from ..settings import Settings
from .base import FrameHandler, HistoryPage, Inbox, LostHandler, Published, ReadState, build_frame

_SWEEP_SECONDS = 60.0


@dataclass(slots=True)
class _Stream:
    entries: deque[tuple[IdKey, str, str]] = field(default_factory=deque)  # (key, id, frame)
    max_deleted: IdKey = (0, 0)
    last_write_ms: int = 0


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryBroker:
    """Keeps history, read markers and idempotency keys in this process."""

    def __init__(self, settings: Settings, replica_id: str) -> None:
        self.replica_id = replica_id
        self._size = settings.history_size
        self._ttl_ms = settings.history_ttl_seconds * 1000
        self._idem_ttl_ms = settings.idempotency_ttl_seconds * 1000
        self._seq = 0
        self._clock = 0
        self._streams: dict[str | None, _Stream] = {}
        self._read: dict[str, IdKey] = {}
        self._idempotency: dict[str, tuple[Published, int]] = {}
        self._subscribed: set[str] = set()
        self._presence: dict[str, int] = {}
        self._on_frame: FrameHandler | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        self._on_frame = on_frame
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._on_frame = None

    @property
    def ready(self) -> bool:
        return self._on_frame is not None

    async def ping(self) -> None:
        return None

    @property
    def position(self) -> str:
        # Before any publish (or long after the last), "now" is a cursor history can still vouch for.
        return max(f"{self._clock}-{self._seq}", f"{_now_ms() - 1000}-0", key=id_key)

    async def subscribe(self, user_id: str) -> None:
        self._subscribed.add(user_id)

    async def unsubscribe(self, user_id: str) -> None:
        self._subscribed.discard(user_id)

    def set_presence(self, user_id: str, sockets: int) -> None:
        if sockets:
            self._presence[user_id] = sockets
        else:
            self._presence.pop(user_id, None)

    async def publish(
        self, user_id: str | None, event_json: str, data_json: str, idempotency_key: str | None
    ) -> Published:
        now = _now_ms()
        if idempotency_key is not None:
            known = self._idempotency.get(idempotency_key)
            if known is not None and known[1] > now:
                first = known[0]
                return Published(first.id, first.ts, self._online(user_id), duplicate=True)
        self._clock = max(self._clock, now)
        self._seq += 1
        key = (self._clock, self._seq)
        id_ = f"{key[0]}-{key[1]}"
        frame = build_frame(id_, event_json, data_json, key[0], broadcast=user_id is None)
        self._append(user_id, key, id_, frame)
        published = Published(id_, key[0], self._online(user_id))
        if idempotency_key is not None:
            self._idempotency[idempotency_key] = (published, now + self._idem_ttl_ms)
        if self._on_frame is not None and (user_id is None or user_id in self._subscribed):
            self._on_frame(user_id, frame)
        return published

    async def history(self, user_id: str | None, after: str, limit: int) -> HistoryPage:
        after_key = id_key(after)
        stream = self._streams.get(user_id)
        if stream is None:
            return HistoryPage([], is_recoverable(after_key, (0, 0), _now_ms(), self._ttl_ms))
        frames = [frame for key, _, frame in stream.entries if key > after_key][:limit]
        return HistoryPage(frames, is_recoverable(after_key, stream.max_deleted, _now_ms(), self._ttl_ms))

    async def inbox(self, user_id: str, before: str | None, limit: int) -> Inbox:
        stream = self._streams.get(user_id)
        entries = list(stream.entries) if stream else []
        if before is not None:
            before_key = id_key(before)
            entries = [entry for entry in entries if entry[0] < before_key]
        frames = [frame for _, _, frame in reversed(entries[-limit:])] if limit else []
        return Inbox(frames, self._unread(user_id))

    async def mark_read(self, user_id: str, up_to: str) -> int:
        stream = self._streams.get(user_id)
        if stream is None or not stream.entries:
            return 0
        target = min(id_key(up_to), stream.entries[-1][0])
        if target > self._read.get(user_id, (0, 0)):
            self._read[user_id] = target
            count = self._unread(user_id)
            if self._on_frame is not None and user_id in self._subscribed:
                self._on_frame(user_id, f'{{"type":"unread","count":{count}}}')
            return count
        return self._unread(user_id)

    async def read_state(self, user_id: str, notification_id: str) -> ReadState:
        key = id_key(notification_id)
        stream = self._streams.get(user_id)
        retained = stream is not None and any(entry[0] == key for entry in stream.entries)
        return ReadState(read=key <= self._read.get(user_id, (0, 0)), retained=retained)

    def _online(self, user_id: str | None) -> int | None:
        return None if user_id is None else self._presence.get(user_id, 0)

    def _unread(self, user_id: str) -> int:
        stream = self._streams.get(user_id)
        marker = self._read.get(user_id, (0, 0))
        return sum(1 for entry in stream.entries if entry[0] > marker) if stream else 0

    def _append(self, user_id: str | None, key: IdKey, id_: str, frame: str) -> None:
        stream = self._streams.setdefault(user_id, _Stream())
        stream.entries.append((key, id_, frame))
        stream.last_write_ms = key[0]
        oldest_kept = key[0] - self._ttl_ms
        while stream.entries and (len(stream.entries) > self._size or stream.entries[0][0][0] < oldest_kept):
            stream.max_deleted = stream.entries.popleft()[0]

    async def _sweep_forever(self) -> None:
        """Forget idle streams and stale idempotency keys, as Redis expiry would."""
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            now = _now_ms()
            for user_id in [u for u, s in self._streams.items() if s.last_write_ms < now - self._ttl_ms]:
                del self._streams[user_id]
                if user_id is not None:
                    self._read.pop(user_id, None)
            for key in [k for k, (_, expires) in self._idempotency.items() if expires <= now]:
                del self._idempotency[key]
