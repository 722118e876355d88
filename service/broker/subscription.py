"""Subscription: one replica's sharded subscription to the streams its sockets receive.

Each stream has an exact channel (never a pattern: `a*` is just the user `a*`), subscribed with
SSUBSCRIBE while the replica has a local member and released with its last. The connection is read
raw (resp.RawConnection). Per stream, the replica keeps a position: the newest id it has handed
on, or the cursor read right after subscribing. Live frames at or below it are dropped, so a gap
replayed from history is never delivered twice, and after any break the gap of every stream is
replayed from its own position. A probe that this replica publishes to itself proves the
subscription alive; one that does not come back means it is rebuilt.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ..frames import resync
from ..ids import IdKey, id_key, is_recoverable
from ..metrics import Metrics
from ..settings import Settings
from . import scripts
from .base import FrameHandler, LostHandler, frame_id
from .connector import Connector
from .pipeline import AutoPipeline, Lua
from .resp import RawConnection, command

logger = logging.getLogger("service.broker")

_FAILURES = (RedisError, OSError, TimeoutError)
_REPLAY_CHUNK = 200

# The key of a stream's `suffix` (see RedisBroker._key).
KeyOf = Callable[[str, str], str]


class Subscription:
    """Keeps the replica subscribed to its streams' channels and hands their frames on, once each."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        redis: aioredis.Redis,
        pipeline: AutoPipeline,
        sub_client: aioredis.Redis,
        key: KeyOf,
        probe_stream: str,
        connector: Connector,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._redis = redis
        self._sub_client = sub_client
        self._key = key
        self._connector = connector
        self._ttl_ms = settings.history_ttl_seconds * 1000
        self._channel_head = len(key("", "c")) - 3  # `<prefix>:{` before a channel's stream name
        self._probe_channel = key(probe_stream, "c")
        self._pipeline = pipeline
        self._cursor = Lua.of(scripts.CURSOR)
        self.on_frame: FrameHandler | None = None
        self.on_lost: LostHandler | None = None
        self.restarted: Callable[[], None] = lambda: None  # Redis came back without its data

        self._streams: set[str] = set()
        self._positions: dict[str, IdKey] = {}
        self._pubsub: RawConnection | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._lost_because: str | None = None  # why the connection was dropped, if we dropped it
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._unsubscribing: dict[str, int] = {}  # channels we asked to leave, still to be confirmed
        self._early: list[Any] = []  # replies read while confirming, for `_read_messages`
        self.subscribed = False
        self.last_probe = float("-inf")
        self._lineage: tuple[str, str] | None = None  # the data's replication ids, to tell a failover from a loss

    def on_primary(self) -> bool:
        """Whether the subscription is on the primary: anywhere else it hears only what reaches that
        node, if anything, however well its probe goes."""
        return self._connector.serves(self._pubsub)

    def primary_changed(self) -> None:
        pubsub = self._pubsub
        if pubsub is not None and not self._connector.serves(pubsub):
            self._lost_because = "the Redis primary changed"
            pubsub.abort()

    def position(self, stream: str) -> str | None:
        key = self._positions.get(stream) if self.subscribed else None
        return None if key is None else f"{key[0]}-{key[1]}"

    async def subscribe(self, stream: str) -> None:
        self._streams.add(stream)
        if self._pubsub is None or not self.subscribed:
            # The next (re)subscription includes it, and replays what was published after this
            # position: a client resuming meanwhile reads history only up to about here.
            await self._read_position(stream)
            return
        channel = self._key(stream, "c")
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        try:
            self._pubsub.write(command("SSUBSCRIBE", channel))
            async with asyncio.timeout(self._settings.probe_timeout_seconds):
                await confirmed
        except (*_FAILURES, asyncio.CancelledError):
            # The subscription loop notices a broken link and resubscribes every stream it holds.
            self._confirmations.pop(channel, None)
            if not confirmed.done():
                confirmed.cancel()
        await self._read_position(stream)

    async def _read_position(self, stream: str) -> None:
        """Everything published to the stream after this position reaches this replica (live, or
        replayed after a rebuild). Without Redis there is none, and a rebuild starts from its cursor."""
        try:
            async with asyncio.timeout(self._settings.probe_timeout_seconds):
                cursor = id_key(await self._pipeline.evaluate(self._cursor, [self._key(stream, "n")], []))
        except _FAILURES:
            return
        if stream in self._streams:
            self._positions[stream] = max(cursor, self._positions.get(stream, (0, 0)))

    async def unsubscribe(self, stream: str) -> None:
        self._streams.discard(stream)
        self._positions.pop(stream, None)
        if self._pubsub is not None and self.subscribed:
            channel = self._key(stream, "c")
            try:
                self._pubsub.write(command("SUNSUBSCRIBE", channel))
            except _FAILURES:
                return
            self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1

    # ---- the loop

    async def run_forever(self) -> None:
        """Keep one subscription alive; on any break, rebuild it and replay each stream's gap."""
        attempt = 0
        while True:
            try:
                await self._subscribe_all()
                attempt = 0
                await self._read_messages()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: rebuild the subscription
                if self.subscribed:
                    logger.warning("redis subscription lost: %s", exc or type(exc).__name__)
                self._metrics.broker_errors.inc()
            self.subscribed = False
            self.close()
            attempt += 1
            self._metrics.broker_reconnects.inc()
            # Capped exponential backoff with full jitter: replicas do not stampede a returning Redis.
            # Cut short when Sentinel names a new primary: the retry then has somewhere to go.
            cap = min(self._settings.reconnect_max_seconds, 0.1 * 2 ** min(attempt, 10))
            await self._connector.pause(random.uniform(cap / 2, cap))

    async def _subscribe_all(self) -> None:
        self._early = []
        self._lost_because = None
        streams = set(self._streams)
        async with asyncio.timeout(self._settings.probe_timeout_seconds):
            pubsub = self._pubsub = await RawConnection.open(self._sub_client)
            await self._ssubscribe(pubsub, [self._probe_channel, *(self._key(s, "c") for s in streams)])
            info = await self._redis.info("replication")
            # Streams joined or left while this ran: `subscribe`/`unsubscribe` left them to us.
            for _ in range(10):
                added, removed = self._streams - streams, streams - self._streams
                if not added and not removed:
                    break
                streams = set(self._streams)
                if added:
                    await self._ssubscribe(pubsub, [self._key(s, "c") for s in added])
                if removed:
                    pubsub.write(command("SUNSUBSCRIBE", *(self._key(s, "c") for s in removed)))
            self.subscribed = True  # from here on, `subscribe` and `unsubscribe` talk to Redis themselves
            self.last_probe = time.monotonic()
        # A promoted replica carries on its old primary's replication id (as replid2); a Redis that
        # restarted, having lost or reloaded its data, starts a new one.
        lineage = (str(info.get("master_replid")), str(info.get("master_replid2")))
        restarted = self._lineage is not None and self._lineage[0] not in lineage
        self._lineage = lineage
        if restarted:
            # Redis lost its data: nothing to replay from, every id sequence starts again.
            self._positions.clear()
            self.restarted()
            if self.on_lost is not None:
                await self.on_lost()
        streams = set(self._streams)
        await self._replay_gaps([s for s in streams if s in self._positions])
        await self._read_cursors([s for s in streams if s not in self._positions])
        logger.info("redis subscription ready: %d streams", len(streams))

    async def _ssubscribe(self, pubsub: RawConnection, channels: list[str]) -> None:
        pubsub.write(command("SSUBSCRIBE", *channels))
        await self._confirm(pubsub, set(channels))

    async def _read_cursors(self, streams: list[str]) -> None:
        for start in range(0, len(streams), _REPLAY_CHUNK):
            chunk = streams[start : start + _REPLAY_CHUNK]
            cursors = await asyncio.gather(
                *(self._pipeline.evaluate(self._cursor, [self._key(stream, "n")], []) for stream in chunk)
            )
            for stream, cursor in zip(chunk, cursors, strict=True):
                if stream in self._streams:
                    self._positions[stream] = max(id_key(cursor), self._positions.get(stream, (0, 0)))

    async def _replay_gaps(self, streams: list[str]) -> None:
        """Hand the local sockets what the broken subscription missed: each stream's notifications
        after its position, from history, in id order. The same ones arriving live later are
        dropped by position. A stream that lost entries in its gap gets a `resync` instead."""
        on_frame = self.on_frame
        assert on_frame is not None
        replayed = lost = 0
        now_ms = time.time_ns() // 1_000_000
        for start in range(0, len(streams), _REPLAY_CHUNK):
            chunk = streams[start : start + _REPLAY_CHUNK]
            pipe = self._redis.pipeline(transaction=False)
            for stream in chunk:
                after = "{}-{}".format(*self._positions[stream])
                pipe.xrange(self._key(stream, "h"), f"({after}", "+")
                pipe.xinfo_stream(self._key(stream, "h"))
            replies = await pipe.execute(raise_on_error=False)
            for i, stream in enumerate(chunk):
                entries, info = replies[2 * i], replies[2 * i + 1]
                after_key = self._positions.get(stream)
                if after_key is None:
                    continue  # left meanwhile
                max_deleted = id_key(info["max-deleted-entry-id"]) if isinstance(info, dict) else (0, 0)
                if isinstance(entries, Exception) or not is_recoverable(after_key, max_deleted, now_ms, self._ttl_ms):
                    lost += 1
                    self._metrics.dropped.labels("gap_unrecoverable").inc()
                    on_frame(stream, resync(stream))
                    continue
                for id_, fields in entries:
                    self._positions[stream] = id_key(id_)
                    on_frame(stream, fields["f"])
                    replayed += 1
        if replayed or lost:
            logger.info("replayed %d notifications missed by the subscription (%d streams lost some)", replayed, lost)

    async def _confirm(self, pubsub: RawConnection, pending: set[str]) -> None:
        """Read until Redis confirmed every channel; replies met meanwhile wait for `_read_messages`."""
        while pending:
            for reply in await pubsub.replies():
                if isinstance(reply, ResponseError):
                    raise reply
                if reply[0] == "ssubscribe" and reply[1] in pending:
                    pending.discard(reply[1])
                else:
                    self._early.append(reply)

    async def _read_messages(self) -> None:
        """Deliver every message until the connection fails or the probe stops coming back."""
        pubsub = self._pubsub
        assert pubsub is not None
        on_frame = self.on_frame
        assert on_frame is not None
        head = self._channel_head
        probe_channel = self._probe_channel
        positions = self._positions
        dropped = self._metrics.dropped.labels("duplicate")
        batch, self._early = self._early, []
        self._watch_probe(pubsub)
        try:
            while True:
                for reply in batch:
                    if isinstance(reply, ResponseError):
                        raise reply
                    kind, channel = reply[0], reply[1]
                    if kind == "smessage":
                        if channel == probe_channel:
                            self.last_probe = time.monotonic()
                            continue
                        stream, data = channel[head:-3], reply[2]
                        id_ = frame_id(data)
                        if id_ is not None:
                            key = id_key(id_)
                            last = positions.get(stream)
                            if last is not None and key <= last:
                                dropped.inc()  # already replayed
                                continue
                            positions[stream] = key
                        on_frame(stream, data)
                    elif kind == "ssubscribe":
                        confirmed = self._confirmations.pop(channel, None)
                        if confirmed is not None and not confirmed.done():
                            confirmed.set_result(None)
                    elif kind == "sunsubscribe":
                        asked = self._unsubscribing.pop(channel, 0)
                        if asked > 1:
                            self._unsubscribing[channel] = asked - 1
                        elif not asked and channel[head:-3] in self._streams:
                            # Redis dropped a channel we still want (its slot moved): start again.
                            raise ConnectionError(f"redis unsubscribed {channel!r}")
                if batch:
                    self._metrics.broker_last_message.set(time.time())
                batch = await pubsub.replies()
        except _FAILURES:
            if self._lost_because is not None:
                raise ConnectionError(self._lost_because) from None
            raise

    def _watch_probe(self, pubsub: RawConnection) -> None:
        """Every probe interval: a subscription whose probe has not come back in time is dropped,
        and so is one on a node that is not the primary (a demoted one still relays the probe)."""
        self._probe_timer = None
        if self._pubsub is not pubsub:
            return
        timeout = self._settings.probe_timeout_seconds
        if time.monotonic() - self.last_probe > timeout:
            self._metrics.probe_failures.inc()
            self._lost_because = f"no probe back from Redis for {timeout:g}s"
            pubsub.abort()  # the read fails at once, and the subscription is rebuilt
            return
        if not self._connector.serves(pubsub):
            self.primary_changed()
            return
        loop = asyncio.get_running_loop()
        self._probe_timer = loop.call_later(self._settings.probe_interval_seconds, self._watch_probe, pubsub)

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for confirmed in self._confirmations.values():
            if not confirmed.done():
                confirmed.cancel()
        self._confirmations.clear()
        self._unsubscribing.clear()
        if pubsub is not None:
            pubsub.abort()  # Redis drops a connection's subscriptions with it
