"""RedisBroker: Redis pub/sub between replicas, Redis streams for history.

Channels are exact names, one per user plus one for broadcasts: a user id is never part of a
pattern, so `a*` is just the user called `a*`. The subscription is proven alive by a probe that
this replica publishes to itself; a probe that does not come back means the subscription is
rebuilt and what was missed meanwhile is replayed from history.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from ..errors import BrokerUnavailable
from ..frames import RESYNC
from ..ids import id_key, is_recoverable, parse_id
from ..metrics import Metrics
from ..settings import Settings
from . import scripts
from .base import FrameHandler, HistoryPage, Inbox, LostHandler, Published, ReadState, frame_id
from .connector import Connector
from .pipeline import AutoPipeline
from .resp import RawConnection, bulk, command

logger = logging.getLogger("service.broker")

_FAILURES = (RedisError, OSError, TimeoutError)
# A replica whose heartbeat is this old is gone (killed without saying goodbye): forget it.
_FORGET_REPLICAS_MS = 600_000
_PING_DEADLINE = 0.5
_FLAG = {False: bulk("0"), True: bulk("1")}


class RedisBroker:
    """Fans out through Redis pub/sub and keeps history in Redis streams."""

    def __init__(self, settings: Settings, replica_id: str, metrics: Metrics) -> None:
        assert settings.redis_url is not None
        self.replica_id = replica_id
        self._settings = settings
        self._metrics = metrics
        p = settings.redis_prefix
        self._key_seq, self._key_clock, self._key_replicas = f"{p}:seq", f"{p}:clock", f"{p}:replicas"
        self._broadcast_channel = f"{p}:b"
        self._broadcast_stream = f"{p}:bh"
        self._probe_channel = f"{p}:probe:{replica_id}"
        self._prefix = p
        self._ttl_ms = settings.history_ttl_seconds * 1000
        # Where Redis is (one node, or the primary Sentinel names and follows) and how to reach it (TLS).
        self._connector = Connector(settings)
        # Commands get a hard deadline; the pool blocks rather than opening a socket per stuck call.
        self._redis = self._connector.client(
            decode_responses=True,
            # The call's own deadline (`_call`) always fires before the socket times out: a reply that
            # is merely late is never retried, since the publish script may already have run.
            # The one retry is for a pooled connection found dead (Redis restarted), where it did not.
            socket_timeout=settings.publish_timeout_seconds + 1.0,
            socket_connect_timeout=settings.publish_timeout_seconds,
            retry=Retry(NoBackoff(), 1),
            max_connections=64,
        )
        # Makes the subscription's connection, which is then read raw (resp.RawConnection). It waits
        # for messages indefinitely: the probe, not a socket timeout, finds stalls.
        self._sub_client = self._connector.client(
            decode_responses=True,
            socket_connect_timeout=settings.publish_timeout_seconds,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        # Publishes, the hot path, share one pipelined connection; everything else uses the pool.
        self._pipeline = AutoPipeline(
            self._redis,
            settings.publish_timeout_seconds,
            replicas=settings.redis_replicas_ack,
            on_broken=self._connector.suspect,
        )
        # The publish command is encoded once around what changes per call (see `publish`): 18 parts,
        # EVALSHA (or EVAL), the script, the key count, 7 keys and 8 arguments.
        sha = self._redis.register_script(scripts.PUBLISH).sha
        self._publish_head = {
            run: b"*18\r\n" + bulk(run) + bulk(script) + bulk(7)
            for run, script in (("EVALSHA", sha), ("EVAL", scripts.PUBLISH))
        }
        self._publish_counters = bulk(self._key_seq) + bulk(self._key_clock)
        self._publish_replicas = bulk(self._key_replicas)
        self._publish_bounds = (
            bulk(settings.history_size) + bulk(self._ttl_ms) + bulk(settings.idempotency_ttl_seconds * 1000)
        )
        self._publish_window = bulk(int(settings.probe_timeout_seconds * 3000))
        self._mark_read_script = self._redis.register_script(scripts.MARK_READ)
        self._unread_script = self._redis.register_script(scripts.UNREAD)
        self._mark_script = self._redis.register_script(scripts.MARK)

        # Subscription state
        self._users: set[str] = set()
        self._pubsub: RawConnection | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._lost_because: str | None = None  # why the subscription's connection was dropped, if we dropped it
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._subscribed = False
        self._subscribed_once = False
        self._last_probe = float("-inf")
        self._watermark: str | None = None
        self._lineage: tuple[str, str] | None = None  # the data's replication ids, to tell a failover from a loss
        self._early: list[Any] = []  # replies read while confirming subscriptions, for `_read_messages`

        # Presence: sockets per user on this replica, written to Redis in the background
        self._presence: dict[str, int] = {}
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()

        self._on_frame: FrameHandler | None = None
        self._on_lost: LostHandler | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle

    async def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        self._on_frame, self._on_lost = on_frame, on_lost
        self._connector.on_change(self._primary_changed)
        await self._connector.start()
        self._tasks = [
            asyncio.create_task(self._subscription_forever(), name="redis-subscription"),
            asyncio.create_task(self._probe_forever(), name="redis-probe"),
            asyncio.create_task(self._presence_forever(), name="redis-presence"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                pipe = self._redis.pipeline(transaction=False)
                for user_id in self._presence:
                    pipe.hdel(self._presence_key(user_id), self.replica_id)
                pipe.zrem(self._key_replicas, self.replica_id)
                await pipe.execute()
        await self._close_pubsub()
        await self._pipeline.aclose()
        await self._redis.aclose()
        await self._sub_client.aclose()
        await self._connector.aclose()

    @property
    def ready(self) -> bool:
        return (
            self._subscribed
            and time.monotonic() - self._last_probe < self._settings.probe_timeout_seconds
            and self._connector.serves(self._pubsub)
        )

    @property
    def position(self) -> str | None:
        # Moved forward by every message and every probe mark this replica receives.
        return self._watermark if self._subscribed else None

    async def ping(self) -> None:
        if not self.ready:
            raise BrokerUnavailable("Redis subscription is not established")
        # Readiness probes usually wait one second: answer 503 well before that.
        await self._call(self._redis.ping(), _PING_DEADLINE)

    # ---- subscriptions

    async def subscribe(self, user_id: str) -> None:
        self._users.add(user_id)
        channel = self._user_channel(user_id)
        if self._pubsub is None or not self._subscribed:
            return  # the next (re)subscription includes it
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        try:
            self._pubsub.write(command("SUBSCRIBE", channel))
            async with asyncio.timeout(self._settings.probe_timeout_seconds):
                await confirmed
        except (*_FAILURES, asyncio.CancelledError):
            # The subscription loop notices a broken link and resubscribes every user it holds.
            self._confirmations.pop(channel, None)
            if not confirmed.done():
                confirmed.cancel()

    async def unsubscribe(self, user_id: str) -> None:
        self._users.discard(user_id)
        if self._pubsub is not None and self._subscribed:
            with contextlib.suppress(*_FAILURES):
                self._pubsub.write(command("UNSUBSCRIBE", self._user_channel(user_id)))

    def set_presence(self, user_id: str, sockets: int) -> None:
        if sockets:
            self._presence[user_id] = sockets
        else:
            self._presence.pop(user_id, None)
        self._dirty.add(user_id)
        self._dirty_event.set()

    # ---- publish and history

    async def publish(
        self, user_id: str | None, event_json: str, data_json: str, idempotency_key: str | None
    ) -> Published:
        if user_id is None:
            stream, channel, presence = self._broadcast_stream, self._broadcast_channel, f"{self._prefix}:o"
        else:
            stream, channel, presence = self._stream(user_id), self._user_channel(user_id), self._presence_key(user_id)
        idem = f"{self._prefix}:i:{hashlib.sha256(idempotency_key.encode()).hexdigest()}" if idempotency_key else ""
        # KEYS and ARGV in the order scripts.PUBLISH reads them.
        body = b"".join(
            (
                bulk(stream),
                bulk(channel),
                self._publish_counters,
                bulk(idem or f"{self._prefix}:i:-"),
                bulk(presence),
                self._publish_replicas,
                bulk(event_json),
                bulk(data_json),
                self._publish_bounds,
                _FLAG[user_id is None],
                _FLAG[bool(idem)],
                self._publish_window,
            )
        )
        try:
            id_, duplicate, online = await self._run_publish(body)
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        return Published(id_, id_key(id_)[0], None if online < 0 else int(online), duplicate=bool(duplicate))

    async def _run_publish(self, body: bytes) -> Any:
        # Acknowledged: with NOTIFY_REDIS_REPLICAS_ACK, not before that many replicas confirm it (WAIT).
        try:
            return await self._pipeline.execute(self._publish_head["EVALSHA"] + body, acknowledged=True)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # Redis restarted or its script cache was flushed: EVAL runs the script and caches it again.
        return await self._pipeline.execute(self._publish_head["EVAL"] + body, acknowledged=True)

    async def history(self, user_id: str | None, after: str, limit: int) -> HistoryPage:
        stream = self._broadcast_stream if user_id is None else self._stream(user_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrange(stream, f"({after}", "+", count=limit)
        pipe.xinfo_stream(stream)
        entries, info = await self._call(pipe.execute(raise_on_error=False))
        if isinstance(entries, Exception):
            raise BrokerUnavailable("could not read history") from entries
        recovered = self._recovered(info, after, time.time_ns() // 1_000_000)
        return HistoryPage([fields["f"] for _, fields in entries], recovered)

    async def inbox(self, user_id: str, before: str | None, limit: int) -> Inbox:
        stream = self._stream(user_id)
        if before is not None and id_key(before) == (0, 0):
            # Nothing is older than 0-0, and Redis refuses the exclusive range "(0-0".
            unread = await self._call(self._unread_script(keys=[self._read_key(user_id), stream]))
            return Inbox([], int(unread))
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrevrange(stream, f"({before}" if before else "+", "-", count=limit)
        await self._unread_script(keys=[self._read_key(user_id), stream], client=pipe)
        entries, unread = await self._call(pipe.execute())
        return Inbox([fields["f"] for _, fields in entries], int(unread))

    async def mark_read(self, user_id: str, up_to: str) -> int:
        keys = [self._read_key(user_id), self._stream(user_id), self._user_channel(user_id)]
        return int(await self._call(self._mark_read_script(keys=keys, args=[up_to, self._ttl_ms])))

    async def read_state(self, user_id: str, notification_id: str) -> ReadState:
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._read_key(user_id))
        pipe.xrange(self._stream(user_id), notification_id, notification_id)
        marker, entries = await self._call(pipe.execute())
        read = marker is not None and id_key(notification_id) <= id_key(marker)
        return ReadState(read=read, retained=bool(entries))

    # ---- keys

    def _stream(self, user_id: str) -> str:
        return f"{self._prefix}:h:{user_id}"

    def _user_channel(self, user_id: str) -> str:
        return f"{self._prefix}:u:{user_id}"

    def _read_key(self, user_id: str) -> str:
        return f"{self._prefix}:r:{user_id}"

    def _presence_key(self, user_id: str) -> str:
        return f"{self._prefix}:o:{user_id}"

    def _recovered(self, info: object, after: str, now_ms: int) -> bool:
        """Whether a stream (its XINFO, or an error for a stream that does not exist) still holds
        everything after `after`."""
        max_deleted = id_key(info["max-deleted-entry-id"]) if isinstance(info, dict) else (0, 0)
        return is_recoverable(id_key(after), max_deleted, now_ms, self._ttl_ms)

    async def _call(self, awaitable: Any, deadline: float | None = None) -> Any:
        """Run one Redis call under the publish deadline; every failure becomes BrokerUnavailable."""
        try:
            limit = self._settings.publish_timeout_seconds
            async with asyncio.timeout(min(deadline, limit) if deadline else limit):
                return await awaitable
        except BrokerUnavailable:
            raise
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        self._metrics.broker_errors.inc()
        return BrokerUnavailable(f"Redis is unavailable: {type(exc).__name__}")

    # ---- background loops

    async def _subscription_forever(self) -> None:
        """Keep one subscription alive; on any break, rebuild it and replay the gap."""
        attempt = 0
        while True:
            try:
                await self._subscribe_all()
                attempt = 0
                await self._read_messages()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: rebuild the subscription
                if self._subscribed:
                    logger.warning("redis subscription lost: %s", exc or type(exc).__name__)
                self._metrics.broker_errors.inc()
            self._subscribed = False
            await self._close_pubsub()
            attempt += 1
            self._metrics.broker_reconnects.inc()
            # Capped exponential backoff with full jitter: replicas do not stampede a returning Redis.
            # Cut short when Sentinel names a new primary: the retry then has somewhere to go.
            cap = min(self._settings.reconnect_max_seconds, 0.1 * 2 ** min(attempt, 10))
            await self._connector.pause(random.uniform(cap / 2, cap))

    async def _subscribe_all(self) -> None:
        self._early = []
        self._lost_because = None
        users = set(self._users)
        channels = [self._broadcast_channel, self._probe_channel, *map(self._user_channel, users)]
        async with asyncio.timeout(self._settings.probe_timeout_seconds):
            pubsub = self._pubsub = await RawConnection.open(self._sub_client)
            pubsub.write(command("SUBSCRIBE", *channels))
            await self._confirm(pubsub, set(channels))
            info = await self._redis.info("replication")
            # Users who connected or left while this ran: `subscribe`/`unsubscribe` left them to us.
            for _ in range(10):
                added, removed = self._users - users, users - self._users
                if not added and not removed:
                    break
                users = set(self._users)
                if added:
                    pubsub.write(command("SUBSCRIBE", *map(self._user_channel, added)))
                    await self._confirm(pubsub, set(map(self._user_channel, added)))
                if removed:
                    pubsub.write(command("UNSUBSCRIBE", *map(self._user_channel, removed)))
            self._subscribed = True  # from here on, `subscribe` and `unsubscribe` talk to Redis themselves
            self._last_probe = time.monotonic()
            # Every notification after the mark arrives on this subscription.
            mark = await self._mark(publish=False)
        # A promoted replica carries on its old primary's replication id (as replid2); a Redis that
        # restarted, having lost or reloaded its data, starts a new one.
        lineage = (str(info.get("master_replid")), str(info.get("master_replid2")))
        gap_from = self._watermark if self._subscribed_once else None
        self._subscribed_once = True
        restarted = self._lineage is not None and self._lineage[0] not in lineage
        self._lineage = lineage
        if restarted:
            self._dirty.update(self._presence)  # Redis lost them with the rest of its data
            self._dirty_event.set()
        if restarted and self._on_lost is not None:
            # Redis lost its data when it restarted: nothing to replay from, clients must refetch.
            await self._on_lost()
        elif gap_from is not None:
            # Every user subscribed now, including one who connected during this rebuild: its
            # resume read history before its channel was subscribed again.
            await self._replay_gap(gap_from, mark, set(self._users))
        self._watermark = max(self._watermark or "0-0", mark, key=id_key)
        logger.info("redis subscription ready: %d channels", len(channels))

    async def _replay_gap(self, after: str, upto: str, users: set[str]) -> None:
        """Hand the local sockets what the broken subscription missed: every notification in
        (after, upto] from history, in id order across the users' and the broadcast streams. Later
        ones arrive live on the new subscription; the hub drops what it already delivered. A stream
        that lost entries in the gap gets a `resync` instead."""
        on_frame = self._on_frame
        assert on_frame is not None
        targets: list[str | None] = [None, *sorted(users)]
        frames: list[tuple[tuple[int, int], str | None, str]] = []
        lost: list[str | None] = []
        now_ms = time.time_ns() // 1_000_000
        try:
            for start in range(0, len(targets), 200):
                chunk = targets[start : start + 200]
                pipe = self._redis.pipeline(transaction=False)
                for target in chunk:
                    stream = self._broadcast_stream if target is None else self._stream(target)
                    pipe.xrange(stream, f"({after}", upto)
                    pipe.xinfo_stream(stream)
                replies = await self._call(pipe.execute(raise_on_error=False))
                for i, target in enumerate(chunk):
                    entries, info = replies[2 * i], replies[2 * i + 1]
                    if isinstance(entries, Exception):
                        raise BrokerUnavailable("could not read history")
                    if not self._recovered(info, after, now_ms):
                        lost.append(target)
                        continue
                    frames += [(id_key(id_), target, fields["f"]) for id_, fields in entries]
        except BrokerUnavailable:
            on_frame(None, RESYNC)  # to every local socket
            self._metrics.dropped.labels("gap_unrecoverable").inc()
            return
        frames.sort(key=lambda item: item[0])
        for _, target, frame in frames:
            on_frame(target, frame)
        for target in lost:
            on_frame(target, RESYNC)
        logger.info(
            "replayed %d notifications missed by the subscription (%d streams lost some)", len(frames), len(lost)
        )

    async def _confirm(self, pubsub: RawConnection, pending: set[str]) -> None:
        """Read until Redis confirmed every channel; replies met meanwhile wait for `_read_messages`."""
        while pending:
            for reply in await pubsub.replies():
                if isinstance(reply, ResponseError):
                    raise reply
                if reply[0] == "subscribe" and reply[1] in pending:
                    pending.discard(reply[1])
                else:
                    self._early.append(reply)

    async def _mark(self, publish: bool) -> str:
        """The current mark (see scripts.MARK); with `publish`, also sent round through our probe channel."""
        keys = [self._key_clock, self._key_seq, self._key_replicas, self._probe_channel]
        args = [self.replica_id, _FORGET_REPLICAS_MS, "1" if publish else "0"]
        return str(await self._mark_script(keys=keys, args=args))

    async def _read_messages(self) -> None:
        """Deliver every message until the connection fails or the probe stops coming back."""
        pubsub = self._pubsub
        assert pubsub is not None
        on_frame = self._on_frame
        assert on_frame is not None
        user_prefix = f"{self._prefix}:u:"
        skip = len(user_prefix)
        probe_channel = self._probe_channel
        batch, self._early = self._early, []
        self._watch_probe(pubsub)
        try:
            while True:
                for reply in batch:
                    if isinstance(reply, ResponseError):
                        raise reply
                    kind, channel = reply[0], reply[1]
                    if kind == "message":
                        data = reply[2]
                        if channel == probe_channel:
                            # Everything published before the probe has been received: replays start later.
                            self._last_probe = time.monotonic()
                            if parse_id(data) is not None and self._watermark is not None:
                                self._watermark = max(self._watermark, data, key=id_key)
                            continue
                        id_ = frame_id(data)
                        if id_ is not None:
                            self._watermark = id_
                        on_frame(channel[skip:] if channel.startswith(user_prefix) else None, data)
                    elif kind == "subscribe":
                        confirmed = self._confirmations.pop(channel, None)
                        if confirmed is not None and not confirmed.done():
                            confirmed.set_result(None)
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
        if time.monotonic() - self._last_probe > timeout:
            self._metrics.probe_failures.inc()
            self._lost_because = f"no probe back from Redis for {timeout:g}s"
            pubsub.abort()  # the read fails at once, and the subscription is rebuilt
            return
        if not self._connector.serves(pubsub):
            self._primary_changed()
            return
        loop = asyncio.get_running_loop()
        self._probe_timer = loop.call_later(self._settings.probe_interval_seconds, self._watch_probe, pubsub)

    def _primary_changed(self) -> None:
        """Sentinel named another primary: publishes and the subscription move to it (the
        subscription replays what it missed meanwhile, as after any break)."""
        self._pipeline.drop_link("the Redis primary changed", keep=self._connector.serves)
        pubsub = self._pubsub
        if pubsub is not None and not self._connector.serves(pubsub):
            self._lost_because = "the Redis primary changed"
            pubsub.abort()

    async def _close_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for confirmed in self._confirmations.values():
            if not confirmed.done():
                confirmed.cancel()
        self._confirmations.clear()
        if pubsub is not None:
            pubsub.abort()  # Redis drops a connection's subscriptions with it

    async def _probe_forever(self) -> None:
        """Publish a probe to ourselves and refresh this replica's heartbeat, every interval."""
        interval = self._settings.probe_interval_seconds
        while True:
            try:
                async with asyncio.timeout(self._settings.publish_timeout_seconds):
                    await self._mark(publish=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._metrics.probe_failures.inc()
                logger.debug("probe failed: %s", exc)
            await asyncio.sleep(interval)

    async def _presence_forever(self) -> None:
        """Write changed socket counts to Redis, batched; rewritten in full after a Redis restart."""
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(0.01)  # let a burst of connects coalesce into one pipeline
            self._dirty_event.clear()
            dirty, self._dirty = self._dirty, set()
            try:
                async with asyncio.timeout(self._settings.publish_timeout_seconds):
                    pipe = self._redis.pipeline(transaction=False)
                    for user_id in dirty:
                        key, count = self._presence_key(user_id), self._presence.get(user_id, 0)
                        if count:
                            pipe.hset(key, self.replica_id, count)
                            pipe.pexpire(key, self._ttl_ms)
                        else:
                            pipe.hdel(key, self.replica_id)
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                self._dirty |= dirty
                self._dirty_event.set()
                await asyncio.sleep(1.0)
