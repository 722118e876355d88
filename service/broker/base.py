"""The broker interface: cross-replica fan-out plus the bounded history that resume reads.

Guarantees every implementation keeps:
- `publish` stores the notification in its history and hands it to every subscribed replica in
  one atomic step, or raises BrokerUnavailable. It never returns for a notification it dropped.
- Ids come from one counter: unique across all streams and ordered as published.
- The handler gets the frames of one channel in publish order, from a single task.
- A replica whose subscription broke replays from history, in id order, what it missed; where
  history cannot cover the gap it calls the lost handler, and the hub asks every socket to resync.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

# A frame for local sockets: the target user (None for a broadcast) and the JSON text to send.
FrameHandler = Callable[[str | None, str], None]
# Called when what this replica missed cannot be replayed (Redis came back without its data).
LostHandler = Callable[[], Awaitable[None]]

NOTIFICATION_PREFIX = '{"type":"notification","id":"'


@dataclass(frozen=True, slots=True)
class Published:
    """What `publish` answers: the id, and how many of the user's sockets were online."""

    id: str
    ts: int
    online: int | None = None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Retained frames after a cursor, oldest first; `recovered` is False when some were lost."""

    frames: list[str] = field(default_factory=list)
    recovered: bool = True


@dataclass(frozen=True, slots=True)
class Inbox:
    """A page of a user's notifications, newest first, with the user's unread count."""

    frames: list[str]
    unread: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """Whether the user has read one notification, and whether history still holds it."""

    read: bool
    retained: bool


def frame_id(frame: str) -> str | None:
    """The id of a notification frame this service built; None for control frames."""
    if not frame.startswith(NOTIFICATION_PREFIX):
        return None
    start = len(NOTIFICATION_PREFIX)
    return frame[start : frame.index('"', start)]


def build_frame(id_: str, event_json: str, data_json: str, ts: int, broadcast: bool) -> str:
    """The notification frame, assembled from pre-encoded JSON parts (the Lua script mirrors this)."""
    tail = ',"broadcast":true}' if broadcast else "}"
    return f'{NOTIFICATION_PREFIX}{id_}","event":{event_json},"data":{data_json},"ts":{ts}{tail}'


class Broker(Protocol):
    """Carries notifications between replicas and keeps their bounded history."""

    replica_id: str

    async def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        """Connect and begin delivering frames; returns even while the backend is still down."""

    async def stop(self) -> None:
        """Unsubscribe, forget this replica's presence, close connections."""

    @property
    def ready(self) -> bool:
        """True while publishes can succeed and the subscription is known to be alive."""

    @property
    def position(self) -> str | None:
        """An id such that every notification after it reaches this replica's subscribed channels.

        A client that has seen no notification yet resumes from here."""

    async def subscribe(self, user_id: str) -> None:
        """Start receiving a user's channel on this replica (the hub refcounts calls)."""

    async def unsubscribe(self, user_id: str) -> None:
        """Stop receiving a user's channel on this replica."""

    def set_presence(self, user_id: str, sockets: int) -> None:
        """Record how many sockets the user has open on this replica (written in the background)."""

    async def publish(
        self, user_id: str | None, event_json: str, data_json: str, idempotency_key: str | None
    ) -> Published:
        """Store and fan out one notification (user_id None: broadcast); raises BrokerUnavailable."""

    async def history(self, user_id: str | None, after: str, limit: int) -> HistoryPage:
        """Retained frames of a user (None: broadcasts) with ids after `after`, oldest first."""

    async def inbox(self, user_id: str, before: str | None, limit: int) -> Inbox:
        """The user's retained notifications older than `before`, newest first, and the unread count."""

    async def mark_read(self, user_id: str, up_to: str) -> int:
        """Move the user's read marker forward to `up_to`; returns the unread count.

        When the count changes, every socket of the user on every replica gets an `unread` frame."""

    async def read_state(self, user_id: str, notification_id: str) -> ReadState:
        """Whether the user has read a notification."""

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the backend answers now."""
