"""Subscription: one replica's sharded subscription to the streams its sockets receive.

Each stream has an exact channel (never a pattern: `a*` is just the user `a*`), subscribed with
SSUBSCRIBE while the replica has a local member and released with its last. The subscription is
one connection per primary (`link.Link`; a single Redis or the Sentinel-named primary is the one
primary), holding the channels of the slots it owns, read raw (resp.RawConnection). Per stream,
the replica keeps a position: the newest id it has handed on, or the cursor read right after
subscribing. Live frames at or below it are dropped, so a gap replayed from history is never
delivered twice, and after any break the gap of every stream is replayed from its own position.

Each link proves itself alive with a probe that this replica publishes to itself on a channel of
that primary. A link whose probe does not come back, whose connection breaks, or that Redis
unsubscribes from a channel it still wants (its slot moved) is rebuilt; in a cluster the slot map
is refreshed first, and streams whose slot has a new owner move to that owner's link.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ...config.settings import Settings
from ...core.frames import resync
from ...core.ids import IdKey, id_key, is_recoverable
from ...telemetry.metrics import Metrics
from ..base import FrameHandler, LostHandler
from . import scripts
from .cluster import ClusterPipelines, SlotMap, slot_of
from .connector import Connector
from .link import Address, Link
from .pipeline import AutoPipeline, Lua
from .supervisor import Supervisor

logger = logging.getLogger("service.broker")

_FAILURES = (RedisError, OSError, TimeoutError)
_REPLAY_CHUNK = 200
_SINGLE = ("", 0)  # the one link when there is one primary

# The key of a stream's `suffix` (see RedisBroker._key).
KeyOf = Callable[[str, str], str]


class Subscription:
    """Keeps the replica subscribed to its streams' channels and hands their frames on, once each."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        redis: Any,
        pipeline: AutoPipeline | ClusterPipelines,
        connector: Connector,
        key: KeyOf,
        replica_id: str,
        slots: SlotMap | None,
        make_client: Callable[[Address | None], aioredis.Redis],
        ttl_of: Callable[[str], int],
        supervisor: Supervisor,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis = redis
        self.pipeline = pipeline
        self.connector = connector
        self.key = key
        self._replica = replica_id
        self.slots = slots
        self._make_client = make_client
        self._supervisor = supervisor
        self._ttl_of = ttl_of  # a stream's history age bound (ms): its namespace's, or the global one
        self.channel_head = len(key("", "c")) - 3  # `<prefix>:{` before a channel's stream name
        self._cursor = Lua.of(scripts.CURSOR)
        self.on_frame: FrameHandler | None = None
        self.on_lost: LostHandler | None = None
        self.restarted: Callable[[], None] = lambda: None  # Redis came back without its data

        self.streams: dict[str, Link] = {}  # stream -> the link that holds it
        self.positions: dict[str, IdKey] = {}
        self._links: dict[Address, Link] = {}
        self._parked: set[str] = set()  # subscribed before the topology was known
        self._running = False

    # ---- what the broker asks

    def start(self) -> None:
        if self._running:
            return  # started again after a failure: the links exist
        self._running = True
        for address in self.slots.primaries() if self.slots is not None else [_SINGLE]:
            self._link(address)
        if self.slots is not None:
            self.slots.listeners.append(self._rebalance)
        for stream in self._parked:
            link = self.streams[stream] = self._link(self._owner(stream))
            link.streams.add(stream)
        self._parked.clear()

    async def stop(self) -> None:
        self._running = False
        links, self._links = list(self._links.values()), {}
        await asyncio.gather(*(link.stop() for link in links))

    @property
    def ready(self) -> bool:
        links = list(self._links.values())
        return bool(links) and all(link.ready for link in links)

    def probe_channels(self) -> list[str]:
        return [link.probe_channel for link in self._links.values() if link.probe_channel]

    def primary_changed(self) -> None:
        for link in self._links.values():
            link.primary_changed()

    def position(self, stream: str) -> str | None:
        link = self.streams.get(stream)
        key = self.positions.get(stream) if link is not None and link.subscribed else None
        return None if key is None else f"{key[0]}-{key[1]}"

    async def subscribe(self, stream: str) -> None:
        if not self._running:
            self._parked.add(stream)  # the links take it once they exist
            return
        link = self._link(self._owner(stream))
        self.streams[stream] = link
        await link.subscribe(stream)

    async def unsubscribe(self, stream: str) -> None:
        self._parked.discard(stream)
        link = self.streams.pop(stream, None)
        self.positions.pop(stream, None)
        if link is not None:
            link.unsubscribe(stream)

    # ---- links

    def _owner(self, stream: str) -> Address:
        return _SINGLE if self.slots is None else self.slots.owner(slot_of(self.key(stream, "c")))

    def _link(self, address: Address) -> Link:
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = Link(
                self, address, self._make_client(None if address == _SINGLE else address)
            )
            if self._running:
                link.start()
        return link

    def link_broke(self) -> None:
        if self.slots is not None:
            self.slots.suspect()  # a failover or a moved slot: the map says where things are now

    def _rebalance(self) -> None:
        """The slot map changed: streams move to their new owner's link (which replays their gap),
        and links to nodes that are no longer primaries go."""
        assert self.slots is not None
        primaries = set(self.slots.primaries())
        for address in primaries:
            self._link(address)
        for stream, link in list(self.streams.items()):
            owner = self._owner(stream)
            if owner != link.address:
                link.unsubscribe(stream, quietly=True)
                new = self._link(owner)
                self.streams[stream] = new
                new.adopt(stream)
        for address, link in list(self._links.items()):
            if address not in primaries and not link.streams:
                del self._links[address]
                self._supervisor.once(f"redis-subscription-stop-{address}", link.stop())

    async def read_positions(self, streams: list[str]) -> None:
        """Everything published to these streams after their position reaches this replica (live,
        or replayed after a rebuild). Without Redis there is none, and a rebuild starts from its cursor."""
        for start in range(0, len(streams), _REPLAY_CHUNK):
            chunk = streams[start : start + _REPLAY_CHUNK]
            try:
                async with asyncio.timeout(self.settings.probe_timeout_seconds):
                    cursors = await asyncio.gather(
                        *(self.pipeline.evaluate(self._cursor, [self.key(stream, "n")], []) for stream in chunk)
                    )
            except _FAILURES:
                return
            for stream, cursor in zip(chunk, cursors, strict=True):
                if stream in self.streams:
                    self.positions[stream] = max(id_key(cursor), self.positions.get(stream, (0, 0)))

    async def replay_gaps(self, streams: list[str]) -> None:
        """Hand the local sockets what a broken link missed: each stream's notifications after its
        position, from history, in id order. The same ones arriving live later are dropped by
        position. A stream that lost entries in its gap gets a `resync` instead."""
        on_frame = self.on_frame
        assert on_frame is not None
        replayed = lost = 0
        now_ms = time.time_ns() // 1_000_000
        for start in range(0, len(streams), _REPLAY_CHUNK):
            chunk = streams[start : start + _REPLAY_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for stream in chunk:
                after = "{}-{}".format(*self.positions[stream])
                pipe.xrange(self.key(stream, "h"), f"({after}", "+")
                pipe.xinfo_stream(self.key(stream, "h"))
            replies = await pipe.execute(raise_on_error=False)
            for i, stream in enumerate(chunk):
                entries, info = replies[2 * i], replies[2 * i + 1]
                after_key = self.positions.get(stream)
                if after_key is None:
                    continue  # left meanwhile
                max_deleted = id_key(info["max-deleted-entry-id"]) if isinstance(info, dict) else (0, 0)
                ttl_ms = self._ttl_of(stream)
                if isinstance(entries, Exception) or not is_recoverable(after_key, max_deleted, now_ms, ttl_ms):
                    lost += 1
                    self.metrics.dropped.labels("gap_unrecoverable").inc()
                    on_frame(stream, resync(stream))
                    continue
                for id_, fields in entries:
                    self.positions[stream] = id_key(id_)
                    on_frame(stream, fields["f"])
                    replayed += 1
        if replayed or lost:
            logger.info("replayed %d notifications missed by the subscription (%d streams lost some)", replayed, lost)

    def probe_channel_for(self, address: Address) -> str:
        """A channel of ours whose slot this primary owns (any one, with a single primary)."""
        for n in range(100_000):
            channel = self.key(f"probe:{self._replica}:{n}", "c")
            if self.slots is None or self.slots.owner(slot_of(channel)) == address:
                return channel
        raise LookupError(f"no slot of {address} found")
