"""The broker interface: cross-replica fan-out plus the bounded history that resume reads.

Everything is per stream (see core/streams.py: a user's, the broadcast stream, each topic).
Guarantees every implementation keeps:
- `publish` stores the notification in its stream's history and hands it to every subscribed
  replica in one atomic step, or raises BrokerUnavailable. It never returns for one it dropped.
- Ids come from each stream's own sequence: unique and increasing within the stream. Nothing may
  compare ids of two streams.
- The handler gets the frames of one stream in publish order, each once, from a single task.
- A replica whose subscription broke replays from history, per stream and in id order, what it
  missed; where history cannot cover the gap the stream's sockets get `resync`, and where the
  backend lost everything it calls the lost handler.
- Presence: how many sockets each user has in a stream on each replica, summed across replicas;
  a replica that dies without saying goodbye is reaped by the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from ..core.errors import BrokerUnavailable
from ..core.streams import BROADCAST, StreamRules, topic_of

# A frame for local sockets: the stream it belongs to and the JSON text to send. A text starting
# with CONTROL is a message to the replicas themselves (see delivery/hub.py), never sent as it is.
FrameHandler = Callable[[str, str], None]
# What sets each stream apart, by stream name (the topics' namespaces decide it).
RulesOf = Callable[[str], StreamRules]

# Called when what this replica missed cannot be replayed (Redis came back without its data).
LostHandler = Callable[[], Awaitable[None]]
# Told of each presence change this replica decides: (stream, "join" or "leave", user, the stream's
# distinct members after it). A join is a user's first socket anywhere; a leave, their last one
# gone and the grace over (or their replica found dead).
PresenceWatch = Callable[[str, str, str, int], None]

NOTIFICATION_PREFIX = '{"type":"notification","id":"'
CONTROL = "!"
BROADCAST_TAIL = ',"broadcast":true}'


@dataclass(frozen=True, slots=True)
class Published:
    """What `publish` answers: the id, and how many of the user's sockets were online (for a
    topic: its distinct members; for broadcasts: None)."""

    id: str
    ts: int
    online: int | None = None
    duplicate: bool = False
    # The `check` given to `publish` was scheduled with it, in the same step (see PublishCheck).
    checked: bool = False


# What `Broker.publish_soon` hands its outcome to: what `publish` would have returned or raised.
Then = Callable[[Published | BrokerUnavailable], None]


@dataclass(frozen=True, slots=True)
class PublishCheck:
    """A due check (service.outbox.checks) a publish may schedule in its own step, so that a
    `fallback` costs the publish no second round trip to Redis; named by the notification's id,
    which only the publish knows. Keys and names as service/outbox/checks_redis.py lays them out:
    the check is `name + id`, in the `due` zset `delay_ms` after the publish and in the `payloads`
    hash, and its state key (`state + name + id`) says "pending" for `keep_ms`. Its payload is
    `head + id + '","event":' + event + ',"data":' + data + ',"ts":' + ts + tail`, the
    notification's own JSON spliced in (not encoded again)."""

    due: str
    payloads: str
    state: str
    name: str
    delay_ms: int
    keep_ms: int
    head: str
    tail: str


class TopicFull(Exception):
    """The topic already has its maximum number of distinct members."""


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Retained frames after a cursor, oldest first; `recovered` is False when some were lost.

    `ahead`: the cursor is past the stream's position (its newest id, and the current time), so no
    client can have seen it: not recovered, and nothing it covers may be taken as delivered."""

    frames: list[str] = field(default_factory=list)
    recovered: bool = True
    ahead: bool = False


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


@dataclass(frozen=True, slots=True)
class MarkedRead:
    """What moving a read marker did: the unread count, and where the marker moved to (None when
    it did not move: an older id, or one past nothing)."""

    unread: int
    moved_to: str | None = None


def frame_id(frame: str) -> str | None:
    """The id of a notification frame this service built; None for control frames."""
    if not frame.startswith(NOTIFICATION_PREFIX):
        return None
    start = len(NOTIFICATION_PREFIX)
    return frame[start : frame.index('"', start)]


def frame_parts(stream: str, sender: str | None = None) -> tuple[str, str]:
    """What a stream's notification frame carries besides id, event, data and ts: the part after
    the id, and the closing part (the Lua script assembles the frame from the same parts)."""
    if stream == BROADCAST:
        return "", BROADCAST_TAIL
    topic = topic_of(stream)
    if topic is None:
        return "", "}"
    extra = ',"topic":' + orjson.dumps(topic).decode()
    if sender is not None:
        extra += ',"from":' + orjson.dumps(sender).decode()
    return extra, "}"


def build_frame(id_: str, event_json: str, data_json: str, ts: int, parts: tuple[str, str]) -> str:
    """The notification frame, assembled from pre-encoded JSON parts (the Lua script mirrors this)."""
    extra, tail = parts
    return f'{NOTIFICATION_PREFIX}{id_}"{extra},"event":{event_json},"data":{data_json},"ts":{ts}{tail}'


def presence_frame(topic: str, changes: dict[str, str], count: int, limit: int) -> str:
    """One interval's announcement (changes: user -> "j" or "l"); above `limit` members, the count
    alone (scripts.ANNOUNCE builds the same frame in Redis)."""
    frame: dict[str, object] = {"type": "presence", "topic": topic}
    if count <= limit:
        frame["joined"] = sorted(user for user, action in changes.items() if action == "j")
        frame["left"] = sorted(user for user, action in changes.items() if action == "l")
    frame["count"] = count
    return orjson.dumps(frame).decode()


class Broker(Protocol):
    """Carries notifications between replicas and keeps their bounded history, per stream."""

    replica_id: str

    async def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        """Connect and begin delivering frames; returns even while the backend is still down."""

    async def stop(self) -> None:
        """Unsubscribe, forget this replica's presence, close connections."""

    @property
    def ready(self) -> bool:
        """True while publishes can succeed and the subscription is known to be alive."""

    def position(self, stream: str) -> str | None:
        """For a subscribed stream: an id such that every notification after it reaches this
        replica. A client that has seen nothing of the stream yet resumes from here."""

    async def subscribe(self, stream: str) -> None:
        """Start receiving a stream on this replica (the hub refcounts calls)."""

    async def unsubscribe(self, stream: str) -> None:
        """Stop receiving a stream on this replica."""

    def set_presence(self, stream: str, user_id: str, sockets: int) -> None:
        """Record the user's sockets in the stream on this replica, written in the background."""

    async def record_presence(self, stream: str, user_id: str, sockets: int) -> None:
        """Record a user's first socket on this replica now, so that a publish made once the
        socket is welcomed counts the user online. Never raises for the store: a write that failed
        or took too long is left to the background, as `set_presence`'s are."""

    def watch_presence(self, watch: PresenceWatch, user_grace_ms: int) -> None:
        """From now on, tell `watch` of every presence change, users' own streams included (whose
        leaves then wait `user_grace_ms`, as a topic's do)."""

    async def join_presence(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> int:
        """Record the user's sockets in a topic now; answers the distinct members across replicas.

        Members are told (`rules.events`) of a user's first socket anywhere, and of their last
        one leaving after the grace unless they are back, in one `presence_frame` per topic per
        interval. Raises TopicFull, BrokerUnavailable; a join that raised (or was cancelled) is
        undone by the caller with `set_presence`, and the broker brings its store back to that."""

    async def members(self, stream: str, limit: int) -> tuple[list[str], int]:
        """Up to `limit` members of a topic (sorted) and the number of distinct members."""

    async def publish(
        self,
        stream: str,
        event_json: str,
        data_json: str,
        idempotency_key: str | None,
        sender: str | None = None,
        check: PublishCheck | None = None,
    ) -> Published:
        """Store and fan out one notification (`sender`: the member who published it to a topic);
        raises BrokerUnavailable. `check`: schedule it in the same step where the broker can
        (`Published.checked` says whether it did; never for a duplicate)."""

    def publish_soon(
        self, stream: str, event_json: str, data_json: str, idempotency_key: str | None, then: Then
    ) -> bool:
        """`publish` with no coroutine, for a backend's publish to a user's or the broadcast stream
        where nothing has to be awaited before it goes out: `then` gets what `publish` would return
        or raise, once, maybe before this returns. False: nothing was done, and `publish` is the way
        (a topic, a cluster, replicated acknowledgement, no connection yet)."""

    async def send(self, stream: str, frame: str) -> None:
        """Fan out a frame that is neither stored nor replayed (signals, moderation); raises
        BrokerUnavailable."""

    async def history(self, stream: str, after: str, limit: int) -> HistoryPage:
        """Retained frames of a stream with ids after `after`, oldest first."""

    async def latest(self, stream: str, before: str | None, limit: int) -> list[str]:
        """Retained frames of a stream older than `before`, newest first."""

    async def inbox(self, user_id: str, before: str | None, limit: int) -> Inbox:
        """The user's retained notifications older than `before`, newest first, and the unread count."""

    async def mark_read(self, user_id: str, up_to: str) -> MarkedRead:
        """Move the user's read marker forward to `up_to` (never past the newest notification).

        When the count changes, every socket of the user on every replica gets an `unread` frame."""

    async def read_state(self, user_id: str, notification_id: str) -> ReadState:
        """Whether the user has read a notification."""

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the backend answers now."""
