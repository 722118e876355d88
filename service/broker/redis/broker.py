"""RedisBroker: sharded pub/sub between replicas, Redis streams for history, per stream.

Every key and channel of one stream carries that stream's hash tag (`<prefix>:{u:alice}:h` is
alice's history, `...:c` her channel, `...:n` her last id), so the publish script touches one slot
and the same code serves a single Redis and a cluster. The subscription (subscription.py),
presence (presence.py) and the publish command's encoding (publishing.py) live beside this module.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from ...config.settings import Settings
from ...core.errors import BrokerUnavailable
from ...core.ids import id_key, is_ahead, is_recoverable
from ...core.streams import BROADCAST, is_topic, user_stream
from ...telemetry.metrics import Metrics
from ..base import (
    FrameHandler,
    HistoryPage,
    Inbox,
    LostHandler,
    MarkedRead,
    PresenceWatch,
    PublishCheck,
    Published,
    ReadState,
    StreamRules,
    Then,
)
from . import scripts
from .budget import TopicBudget
from .clients import RedisClients
from .connector import Connector
from .pipeline import Lua
from .presence import Presence, PresenceKeys, RulesOf
from .publishing import PublishScript, publish_args, publish_keys, published
from .resp import bulk, command
from .subscription import Subscription
from .supervisor import Supervisor
from .upkeep import Upkeep

logger = logging.getLogger("service.broker")

_FAILURES = (RedisError, OSError, TimeoutError)
_PING_DEADLINE = 0.5


class RedisBroker:
    """Fans out through Redis sharded pub/sub and keeps history in Redis streams."""

    def __init__(self, settings: Settings, replica_id: str, metrics: Metrics, rules: RulesOf) -> None:
        assert settings.redis_url is not None
        self.replica_id = replica_id
        self._settings = settings
        self._metrics = metrics
        self._prefix = settings.redis_prefix
        self._ttl_ms = settings.history_ttl_seconds * 1000
        # Where Redis is (one node, or the primary Sentinel names and follows) and how to reach it (TLS).
        self._connector = Connector(settings)
        # The pool, and the pipelined connections publishes share (clients.py).
        clients = RedisClients(settings, self._connector)
        self._redis, self._gate, self._slots, self._pipeline = (
            clients.redis,
            clients.gate,
            clients.slots,
            clients.pipeline,
        )
        self._script = PublishScript(self._pipeline)
        self._publish_bounds = (
            bulk(settings.history_size) + bulk(self._ttl_ms) + bulk(settings.idempotency_ttl_seconds * 1000)
        )
        self._mark_read_script = self._redis.register_script(scripts.MARK_READ)
        self._unread_script = self._redis.register_script(scripts.UNREAD)
        self._supervisor = Supervisor(metrics.broker_task_restarts, settings.reconnect_max_seconds)
        self._subscription = Subscription(
            settings,
            metrics,
            self._redis,
            self._pipeline,
            self._connector,
            self._key,
            replica_id,
            self._slots,
            clients.subscription_client,
            self._ttl,
            self._supervisor,
        )
        self._rules = rules
        keys = PresenceKeys(settings, self._key, self._prefix, rules)
        self._presence = Presence(settings, self._redis, self._pipeline, keys, replica_id)
        self._upkeep = Upkeep(
            settings, metrics, self._redis, self._pipeline, keys, self._presence, self._prefix, replica_id
        )
        self._subscription.restarted = self._presence.rewrite
        self._budget = TopicBudget(self._pipeline, self._prefix, self._ttl)

    # ---- lifecycle

    async def start(self, on_frame: FrameHandler, on_lost: LostHandler) -> None:
        self._subscription.on_frame, self._subscription.on_lost = on_frame, on_lost
        self._connector.on_change(self._primary_changed)
        await self._connector.start()
        self._supervisor.keep("redis-subscription", self._subscribe_forever)
        self._supervisor.keep("redis-probe", self._probe_forever)
        self._supervisor.keep("redis-presence", self._write_presence)
        self._supervisor.keep("redis-presence-beat", self._upkeep.beat_forever)
        self._supervisor.keep("redis-presence-sweep", self._upkeep.sweep_forever)

    async def stop(self) -> None:
        await self._supervisor.stop()
        await self._presence.forget()
        await self._upkeep.forget()
        await self._subscription.stop()
        await self._pipeline.aclose()
        await self._script.aclose()
        await self._redis.aclose()
        await self._connector.aclose()

    async def _subscribe_forever(self) -> None:
        """Start the subscription once the topology is known (a cluster that is down at start is
        waited for), with the broadcast stream, which every replica receives."""
        attempt = 0
        while self._slots is not None:
            try:
                await self._slots.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not reachable yet: asked again
                attempt += 1
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                logger.log(level, "redis cluster not reachable yet: %s", exc)
                await asyncio.sleep(min(self._settings.reconnect_max_seconds, 0.1 * 2 ** min(attempt, 6)))
        self._subscription.start()
        await self._subscription.subscribe(BROADCAST)

    async def _write_presence(self) -> None:
        # A writer that failed took the batch in hand with it: everything is written again.
        self._presence.rewrite()
        await self._presence.write_forever()

    @property
    def ready(self) -> bool:
        return self._subscription.ready

    def position(self, stream: str) -> str | None:
        return self._subscription.position(stream)

    async def ping(self) -> None:
        if not self.ready:
            raise BrokerUnavailable("Redis subscription is not established")
        # Readiness probes usually wait one second: answer 503 well before that.
        await self._call(self._redis.ping(), _PING_DEADLINE)

    # ---- subscriptions and presence

    async def subscribe(self, stream: str) -> None:
        await self._subscription.subscribe(stream)

    async def unsubscribe(self, stream: str) -> None:
        await self._subscription.unsubscribe(stream)

    def set_presence(self, stream: str, user_id: str, sockets: int) -> None:
        self._presence.set(stream, user_id, sockets)

    async def record_presence(self, stream: str, user_id: str, sockets: int) -> None:
        await self._presence.record(stream, user_id, sockets, self._settings.publish_timeout_seconds)

    def watch_presence(self, watch: PresenceWatch, user_grace_ms: int) -> None:
        self._presence.watch_with(watch, user_grace_ms)

    async def join_presence(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> int:
        return await self._call(self._presence.join(stream, user_id, sockets, rules))

    async def members(self, stream: str, limit: int) -> tuple[list[str], int]:
        return await self._call(self._presence.members(stream, limit))

    # ---- publish and history

    async def publish(
        self,
        stream: str,
        event_json: str,
        data_json: str,
        idempotency_key: str | None,
        sender: str | None = None,
        check: PublishCheck | None = None,
    ) -> Published:
        if is_topic(stream):
            try:
                await self._budget.admit(stream, self._rules(stream))
            except _FAILURES as exc:
                raise self._unavailable(exc) from None
        keys, args = self._publish_parts(stream, event_json, data_json, idempotency_key, sender)
        # The check goes in the same step on a single Redis; a cluster keeps it in another slot than
        # the stream's, so there the caller schedules it apart (`checked` stays false).
        if check is None or self._slots is not None:
            check, head, body = None, self._script.plain, keys + args
        else:
            fields = (check.name, check.delay_ms, check.head, check.tail, check.state, check.keep_ms)
            head = self._script.checked
            body = b"".join((keys, bulk(check.due), bulk(check.payloads), args, *map(bulk, fields)))
        try:
            reply = await self._script.run(head, body, self._key(stream, "h"))
        except _FAILURES as exc:
            raise self._unavailable(exc) from None
        return published(reply, check is not None)

    def publish_soon(
        self, stream: str, event_json: str, data_json: str, idempotency_key: str | None, then: Then
    ) -> bool:
        # A topic's budget is awaited first, and a cluster routes by slot (nothing is encoded twice).
        if is_topic(stream) or self._slots is not None:
            return False
        keys, args = self._publish_parts(stream, event_json, data_json, idempotency_key, None)

        def replied(reply: Any, failure: BaseException | None) -> None:
            then(published(reply, False) if failure is None else self._unavailable(failure))

        return self._script.send(keys + args, self._key(stream, "h"), replied)

    def _publish_parts(
        self, stream: str, event_json: str, data_json: str, idempotency_key: str | None, sender: str | None
    ) -> tuple[bytes, bytes]:
        """The publish script's KEYS and ARGV for one notification, encoded."""
        keys = publish_keys(self._key(stream, ""), idempotency_key)
        return keys, publish_args(stream, event_json, data_json, self._bounds(stream), bool(idempotency_key), sender)

    def _primary_changed(self) -> None:
        """Sentinel named another primary: publishes and the subscription move to it (the
        subscription replays what it missed meanwhile, as after any break)."""
        self._pipeline.drop_link("the Redis primary changed", keep=self._connector.serves)
        self._subscription.primary_changed()

    async def send(self, stream: str, frame: str) -> None:
        try:
            channel = self._key(stream, "c")
            await self._pipeline.execute(command("SPUBLISH", channel, frame), key=channel)
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    async def history(self, stream: str, after: str, limit: int) -> HistoryPage:
        key, floor = self._key(stream, "h"), self._floor(stream)
        start = floor if id_key(after) < id_key(floor) else f"({after}"
        pipe = self._redis.pipeline(transaction=True)
        pipe.xrange(key, start, "+", count=limit)
        pipe.xinfo_stream(key)
        # Past the newest id and Redis's clock, the cursor is none this service gave.
        pipe.eval(scripts.NEWEST, 1, self._key(stream, "n"))
        entries, info, newest = await self._call(pipe.execute(raise_on_error=False))
        if isinstance(entries, Exception):
            raise BrokerUnavailable("could not read history") from entries
        if isinstance(newest, list) and is_ahead(id_key(after), id_key(newest[0]) if newest[0] else None, newest[1]):
            return HistoryPage([], recovered=False, ahead=True)
        now_ms = time.time_ns() // 1_000_000
        max_deleted = id_key(info["max-deleted-entry-id"]) if isinstance(info, dict) else (0, 0)
        recovered = is_recoverable(id_key(after), max_deleted, now_ms, self._ttl(stream))
        return HistoryPage([fields["f"] for _, fields in entries], recovered)

    async def latest(self, stream: str, before: str | None, limit: int) -> list[str]:
        floor = self._floor(stream)
        if before is not None and id_key(before) <= id_key(floor):
            return []  # nothing younger than the age bound is older than `before`
        newest = f"({before}" if before else "+"
        entries = await self._call(self._redis.xrevrange(self._key(stream, "h"), newest, floor, count=limit))
        return [fields["f"] for _, fields in entries]

    async def inbox(self, user_id: str, before: str | None, limit: int) -> Inbox:
        stream = user_stream(user_id)
        keys = [self._key(stream, "r"), self._key(stream, "h")]
        frames, unread = await asyncio.gather(
            self.latest(stream, before, limit), self._call(self._unread_script(keys=keys, args=[self._ttl_ms]))
        )
        return Inbox(frames, int(unread))

    async def mark_read(self, user_id: str, up_to: str) -> MarkedRead:
        stream = user_stream(user_id)
        keys = [self._key(stream, "r"), self._key(stream, "h"), self._key(stream, "c")]
        count, moved_to = await self._call(self._mark_read_script(keys=keys, args=[up_to, self._ttl_ms]))
        return MarkedRead(int(count), moved_to or None)

    async def read_state(self, user_id: str, notification_id: str) -> ReadState:
        stream = user_stream(user_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.get(self._key(stream, "r"))
        pipe.xrange(self._key(stream, "h"), notification_id, notification_id)
        marker, entries = await self._call(pipe.execute())
        read = marker is not None and id_key(notification_id) <= id_key(marker)
        retained = bool(entries) and id_key(notification_id) >= id_key(self._floor(stream))
        return ReadState(read=read, retained=retained)

    async def user_script(self, user_id: str, script: Lua, suffixes: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run a script on keys kept beside the user's stream (`<prefix>:{u:<user>}:<suffix>`): one
        slot, so it runs where the user's stream lives, in a cluster too. On the shared pipeline,
        under the publish deadline; raises BrokerUnavailable. For data of a user's own, such as devices."""
        stream = user_stream(user_id)
        return await self._call(self._pipeline.evaluate(script, [self._key(stream, s) for s in suffixes], args))

    # ---- for other parts that keep state in Redis (the outbox)

    @property
    def prefix(self) -> str:
        return self._prefix

    async def evaluate(self, script: Lua, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """Run a script on the shared pipelined connection of the primary that owns its keys (which
        share one hash tag); BrokerUnavailable on failure or past the publish deadline."""
        return await self._call(self._pipeline.evaluate(script, keys, args))

    # ---- helpers

    def _key(self, stream: str, suffix: str) -> str:
        """A key (or channel) of one stream: the stream's name is its hash tag."""
        return f"{self._prefix}:{{{stream}}}:{suffix}"

    def _bounds(self, stream: str) -> bytes:
        """History length, age and idempotency window, encoded for the publish command."""
        if not is_topic(stream):
            return self._publish_bounds
        rules = self._rules(stream)
        if rules.history_size is None and rules.history_ttl_ms is None:
            return self._publish_bounds
        size = rules.history_size or self._settings.history_size
        return bulk(size) + bulk(self._ttl(stream)) + bulk(self._settings.idempotency_ttl_seconds * 1000)

    def _ttl(self, stream: str) -> int:
        return (self._rules(stream).history_ttl_ms or self._ttl_ms) if is_topic(stream) else self._ttl_ms

    def _floor(self, stream: str) -> str:
        """The oldest id young enough to be served: the age bound holds on every read."""
        return f"{time.time_ns() // 1_000_000 - self._ttl(stream)}-0"

    async def _call(self, awaitable: Any, deadline: float | None = None) -> Any:
        """Run one Redis call under the publish deadline; every failure becomes BrokerUnavailable."""
        try:
            limit = self._settings.publish_timeout_seconds
            async with asyncio.timeout(min(deadline, limit) if deadline else limit):
                if self._gate is None:
                    return await awaitable
                return await self._gated(awaitable, self._gate)
        except BrokerUnavailable:
            raise
        except _FAILURES as exc:
            raise self._unavailable(exc) from None

    @staticmethod
    async def _gated(awaitable: Any, gate: asyncio.Semaphore) -> Any:
        try:
            await gate.acquire()
        except BaseException:
            awaitable.close()  # the deadline came first: the call never starts
            raise
        try:
            return await awaitable
        finally:
            gate.release()

    def _unavailable(self, exc: BaseException) -> BrokerUnavailable:
        self._metrics.broker_errors.inc()
        return BrokerUnavailable(f"Redis is unavailable: {type(exc).__name__}")

    async def _probe_forever(self) -> None:
        """Every interval: a probe round through our own channel (presence upkeep has tasks of its
        own: nothing it does can hold the probe back)."""
        interval = self._settings.probe_interval_seconds
        while True:
            try:
                async with asyncio.timeout(self._settings.publish_timeout_seconds):
                    await asyncio.gather(
                        *(
                            self._pipeline.execute(command("SPUBLISH", channel, "1"), key=channel)
                            for channel in self._subscription.probe_channels()
                        )
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                self._metrics.probe_failures.inc()
                logger.debug("probe failed: %s", exc)
            await asyncio.sleep(interval)
