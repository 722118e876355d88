"""Connection: one client socket's bounded outbound queue, whatever carries it (WebSocket or SSE)."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Awaitable, Callable

from .broker import frame_id
from .frames import CloseCode
from .ids import IdKey, id_key
from .metrics import Metrics
from .settings import Settings

Closer = Callable[[int, str], Awaitable[None]]

_BROADCAST_TAIL = ',"broadcast":true}'


class Connection:
    """Frames wait here for the socket's writer; a reader that falls behind is cut off, not buffered."""

    __slots__ = (
        "id", "user_id", "expires_at", "closed", "close_code", "_queue", "_queued_bytes",
        "_max_frames", "_max_bytes", "_ready", "_held", "_closer", "_metrics", "_close_task",
    )

    def __init__(self, user_id: str, expires_at: float, settings: Settings, metrics: Metrics, closer: Closer) -> None:
        self.id = secrets.token_urlsafe(12)
        self.user_id = user_id
        self.expires_at = expires_at
        self.closed = False
        self.close_code: int | None = None
        self._queue: deque[str] = deque()
        self._queued_bytes = 0
        self._max_frames = settings.send_queue_frames
        self._max_bytes = settings.send_queue_bytes
        self._ready = asyncio.Event()
        # While history is replayed, live frames wait here so that none overtakes the replay.
        self._held: list[str] | None = None
        self._closer = closer
        self._metrics = metrics
        self._close_task: asyncio.Task[None] | None = None

    def push(self, frame: str) -> None:
        """Queue a frame; never blocks, so no socket can slow the broker or other sockets."""
        if self._held is not None:
            self._held.append(frame)
            if len(self._held) > self._max_frames:
                self._overflow()
            return
        self._enqueue(frame)

    def hold(self) -> None:
        """Start holding live frames back (before subscribing, when the client resumes)."""
        self._held = []

    def release(self, replayed: list[str], user_floor: IdKey | None, broadcast_floor: IdKey | None) -> None:
        """Queue replayed frames, then the held live ones that the replay did not already cover."""
        held, self._held = self._held or [], None
        for frame in replayed:
            self._enqueue(frame)
        for frame in held:
            id_ = frame_id(frame)
            if id_ is not None:
                floor = broadcast_floor if frame.endswith(_BROADCAST_TAIL) else user_floor
                if floor is not None and id_key(id_) <= floor:
                    continue
            self._enqueue(frame)

    async def next_batch(self) -> list[str]:
        """Wait for queued frames and take them all; empty once the connection is closed."""
        while not self._queue:
            if self.closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        if self.closed:
            return []
        batch = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        return batch

    def close(self, code: int, reason: str) -> None:
        """Close once: stop queueing, wake the writer, and let the transport say goodbye."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._queue.clear()
        self._ready.set()
        self._close_task = asyncio.get_running_loop().create_task(self._closer(code, reason))

    def _enqueue(self, frame: str) -> None:
        if self.closed:
            return
        self._queue.append(frame)
        self._queued_bytes += len(frame)
        if len(self._queue) > self._max_frames or self._queued_bytes > self._max_bytes:
            self._overflow()
            return
        self._ready.set()

    def _overflow(self) -> None:
        self._metrics.slow_consumers.inc()
        self._metrics.dropped.labels("slow_consumer").inc(len(self._queue) + len(self._held or ()))
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume with since")
