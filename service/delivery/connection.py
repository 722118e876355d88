"""Connection: one client socket's bounded outbound queue, whatever carries it (WebSocket or SSE)."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from ..broker import frame_id
from ..config.settings import Settings
from ..core.frames import CloseCode
from ..core.ids import IdKey, id_key
from ..core.ratelimit import TokenBucket
from ..core.timers import TimerWheel
from ..telemetry.metrics import Metrics

Closer = Callable[[int, str], Awaitable[None]]
Sender = Callable[[str], Coroutine[Any, Any, None]]
# Writes a pre-encoded frame at once if the socket can take it; False means "use the Sender".
FrameWriter = Callable[[bytes], bool]
# Runs a send as far as it goes without waiting: None when done, else what finishes it (the server's
# `send_eagerly`, offered through the scope). Without one, every send is a task of its own.
Starter = Callable[[Coroutine[Any, Any, None]], Awaitable[None] | None]


class WriteGate(Protocol):
    """What the server offers for the fan-out (`core.frames.DIRECT_WRITE_EXTENSION`): the socket's
    write while a frame may go straight to it, else None; it calls `on_regate` whenever that changes."""

    direct_write: Callable[[bytes], object] | None
    on_regate: Callable[[], object] | None


_in_a_task: Starter = asyncio.ensure_future

# The server's protocol aborts a peer that does not take its close frame well within this.
_CLOSE_WAIT = 10.0


class Connection:
    """Frames for one client socket; a reader that falls behind is cut off, not buffered.

    Two ways out: a WebSocket attaches a sender, and a frame is written at once while the socket
    keeps up (no task, no wake-up per frame), with a backlog task only while it does not; SSE pulls
    batches with `next_batch`. Either way the backlog is bounded."""

    __slots__ = (
        "id",
        "user_id",
        "expires_at",
        "closed",
        "close_code",
        "_queue",
        "_queued_bytes",
        "_max_frames",
        "_max_bytes",
        "_ready",
        "_held",
        "_floors",
        "topics",
        "grants",
        "claims",
        "presence_asks",
        "_closer",
        "_metrics",
        "_close_task",
        "_send",
        "_send_frame",
        "_start",
        "_flush_task",
        "timers",
        "direct",
        "_gate",
    )

    def __init__(
        self,
        user_id: str,
        expires_at: float,
        settings: Settings,
        metrics: Metrics,
        closer: Closer,
        timers: TimerWheel | None = None,
    ) -> None:
        self.id = secrets.token_urlsafe(12)
        self.user_id = user_id
        self.expires_at = expires_at
        self.closed = False
        self.close_code: int | None = None
        # Made when a frame must wait, and let go once drained: most sockets idle with nothing queued.
        self._queue: deque[str] | None = None
        self._queued_bytes = 0
        self._max_frames = settings.send_queue_frames
        self._max_bytes = settings.send_queue_bytes
        self._ready: asyncio.Event | None = None  # made by the first `next_batch` (SSE only)
        # While a stream's history is replayed, its live frames wait here so none overtakes the replay.
        self._held: dict[str, list[str]] | None = None
        # After a replay: the newest id it covered per stream, until live frames pass it.
        self._floors: dict[str, IdKey] | None = None
        self.topics: set[str] | None = None  # the topics this socket joined
        self.grants: tuple[str, ...] = ()  # the topics its token lets it join (the `topics` claim)
        # Its token's claims, for join hooks; kept only where a namespace has a join hook, so that
        # elsewhere an idle socket holds no copy of them.
        self.claims: dict[str, Any] | None = None
        self.presence_asks: TokenBucket | None = None  # made by the first `presence` frame
        self._closer = closer
        self._metrics = metrics
        self._close_task: asyncio.Task[None] | None = None
        self._send: Sender | None = None
        self._send_frame: FrameWriter | None = None
        self._start: Starter = _in_a_task
        self._flush_task: asyncio.Task[None] | None = None
        self.timers = timers  # where its deadlines (the token's expiry) are kept
        # The socket's write while nothing here or in the server stands between a live frame and the
        # socket (see `_regate`): the hub then writes a fan-out's frame with it, touching no other object.
        self.direct: Callable[[bytes], object] | None = None
        self._gate: WriteGate | None = None

    def attach(
        self,
        send: Sender,
        send_frame: FrameWriter | None = None,
        start: Starter | None = None,
        gate: WriteGate | None = None,
    ) -> None:
        """Write frames through `send` from now on, starting with whatever is queued; where the
        server offers `send_frame`, a frame encoded once for all sockets is written directly,
        where it offers `start`, a send runs at once and takes a task only if it must wait, and
        where it offers `gate`, the hub writes live frames to it itself while it may (`direct`)."""
        self._send = send
        self._send_frame = send_frame
        self._start = start or _in_a_task
        self._gate = gate
        if gate is not None:
            gate.on_regate = self._regate
        if self._queue:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush(None))
        self._regate()

    def _regate(self) -> None:
        """`direct` is the gate's write only while a live frame needs nothing from this object: it
        is open and writing at once (no backlog, no send under way), and no stream is held back for
        a replay or filtered against one. Set again wherever one of these changes, and by the gate
        whenever its own write does."""
        gate = self._gate
        self.direct = (
            gate.direct_write
            if gate is not None
            and self._send is not None
            and self._flush_task is None
            and not self._queue
            and self._held is None
            and self._floors is None
            and not self.closed
            else None
        )

    async def detach(self) -> None:
        """The socket is done: stop writing, and let a close this side started finish first."""
        self.closed = True
        self._send = self._send_frame = None
        self._regate()
        if self._gate is not None:
            self._gate.on_regate = None
        if self._flush_task is not None:
            self._flush_task.cancel()
        if self._close_task is not None:
            await asyncio.wait([self._close_task], timeout=_CLOSE_WAIT)

    def push(self, stream: str, frame: str, wire: bytes | None = None) -> None:
        """Send or queue a frame of a stream (`wire`: the same frame already encoded for the
        socket); never blocks, so no socket can slow the broker or other sockets."""
        if self.closed:
            return  # nothing is kept for a socket that is gone, held or not
        if self._held is not None:
            held = self._held.get(stream)
            if held is not None:
                held.append(frame)
                if len(held) > self._max_frames:
                    self._overflow()
                return
        if self._floors is not None and self._replayed(stream, frame):
            return
        self._enqueue(frame, wire)

    def send(self, frame: str) -> None:
        """Queue a frame for this socket alone (answers, errors): it belongs to no stream."""
        self._enqueue(frame)

    def hold(self, *streams: str) -> None:
        """Start holding the streams' live frames back (before subscribing, when resuming)."""
        if self._held is None:
            self._held = {}
        for stream in streams:
            self._held[stream] = []
        self._regate()

    def release(self, replayed: list[str], floors: dict[str, IdKey], *streams: str) -> None:
        """Queue `replayed` (an answer and the streams' replay), then the live frames the replay
        did not already cover."""
        held = {stream: self._held.pop(stream, []) for stream in streams} if self._held else {}
        if not self._held:
            self._held = None
        if floors:
            self._floors = {**(self._floors or {}), **floors}
        for frame in replayed:
            self._enqueue(frame)
        for stream, frames in held.items():
            for frame in frames:
                self.push(stream, frame)
        self._regate()

    def _replayed(self, stream: str, frame: str) -> bool:
        """Whether the replay already sent this live frame. One can arrive after the release: the
        history read saw it while its pub/sub message was still on the way to this replica."""
        assert self._floors is not None
        floor = self._floors.get(stream)
        id_ = frame_id(frame)
        if floor is None or id_ is None:
            return False
        if id_key(id_) <= floor:
            return True
        # Live frames of one stream arrive in id order: once one is past the floor, none after it is covered.
        del self._floors[stream]
        if not self._floors:
            self._floors = None
            self._regate()
        return False

    async def next_batch(self) -> list[str]:
        """Wait for queued frames and take them all; empty once the connection is closed."""
        if self._ready is None:
            self._ready = asyncio.Event()
        while not self._queue:
            if self.closed:
                return []
            self._ready.clear()
            await self._ready.wait()
        if self.closed:
            return []
        batch = list(self._queue)
        self._queue = None
        self._queued_bytes = 0
        return batch

    def close(self, code: int, reason: str) -> None:
        """Close once: stop queueing, wake the writer, and let the transport say goodbye."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._queue = None
        self._held = self._floors = None
        self._regate()
        if self._ready is not None:
            self._ready.set()
        self._close_task = asyncio.get_running_loop().create_task(self._closer(code, reason))

    def _enqueue(self, frame: str, wire: bytes | None = None) -> None:
        if self.closed:
            return
        if self._send is not None and self._flush_task is None:
            if wire is None or self._send_frame is None or not self._send_frame(wire):
                self._write_now(frame)
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.append(frame)
        self._regate()
        self._queued_bytes += len(frame)
        if len(self._queue) > self._max_frames or self._queued_bytes > self._max_bytes:
            self._overflow()
            return
        if self._ready is not None:
            self._ready.set()

    def _write_now(self, frame: str) -> None:
        """Run the send until it completes or must wait for the peer; only then hand it to a task."""
        assert self._send is not None
        try:
            rest = self._start(self._send(frame))
        except Exception:  # noqa: BLE001 - the peer is gone; the receiving side sees the disconnect
            self._send = None
            self._regate()
            return
        if rest is not None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush(rest))
            self._regate()

    async def _flush(self, rest: Awaitable[None] | None) -> None:
        """Finish a send that had to wait, then write the backlog, then go back to writing at once."""
        try:
            if rest is not None:
                await rest
            while self._queue and self._send is not None:
                frame = self._queue.popleft()
                self._queued_bytes -= len(frame)
                await self._send(frame)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the peer is gone
            self._send = None
        finally:
            self._flush_task = None
            if not self._queue:
                self._queue = None
            self._regate()

    def _overflow(self) -> None:
        """Close a socket that fell too far behind; every frame waiting for it is counted as dropped."""
        held = sum(map(len, self._held.values())) if self._held else 0
        self._metrics.slow_consumers.inc()
        self._metrics.dropped.labels("slow_consumer").inc(len(self._queue or ()) + held)
        self.close(CloseCode.SLOW_CONSUMER, "slow consumer: reconnect and resume with since")
