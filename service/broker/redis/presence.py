"""Presence in Redis: who has sockets in which stream, on which replica, summed across replicas.

Per stream (a user's, or a topic) Redis keeps `members` (user -> sockets on every replica) and,
per replica, `members:<replica>` (user -> sockets there), so the sum survives any one replica:
- a user's own stream is written in the background, batched (it feeds `online` in a publish's
  answer); a topic is written at once, because a join answers the member count;
- each replica beats every probe interval; one that stops beating for `dead_after` is reaped by
  whichever live replica claims it first: its sockets are taken out of every stream it had, and
  topic members are told of every user who had sockets only there;
- a user's last socket leaving a topic starts a grace; a global set lists the topics with leaves
  waiting, and every replica sweeps it, so a leave is told even when its replica is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
from redis.exceptions import RedisError

from ...config.settings import Settings
from ...core.errors import BrokerUnavailable
from ...core.streams import is_topic, topic_of, user_of
from ..base import PresenceWatch, RulesOf, StreamRules, TopicFull
from . import scripts
from .cluster import ClusterPipelines
from .pipeline import AutoPipeline, Lua
from .resp import command

logger = logging.getLogger("service.broker")

_FAILURES = (RedisError, OSError, TimeoutError)
_CLAIM_MS = 30_000
_NO_RULES = StreamRules()

KeyOf = Callable[[str, str], str]


class Presence:
    """This replica's share of presence, and the reaping of replicas that died."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        pipeline: AutoPipeline | ClusterPipelines,
        key: KeyOf,
        prefix: str,
        replica_id: str,
        rules: RulesOf,
    ) -> None:
        self._settings = settings
        self._redis = redis
        # Presence writes share the publishes' pipelined connection: a burst of joins or a rewrite
        # of every member is one write, never a pool connection each.
        self._pipeline = pipeline
        self._key = key
        self._replica = replica_id
        self._rules = rules
        self._ttl_ms = settings.history_ttl_seconds * 1000
        self._replicas = f"{prefix}:replicas"
        self._graces = f"{prefix}:leaving"
        self._streams_of = f"{prefix}:replica:{{0}}:streams"
        self._claim = f"{prefix}:reaping:{{0}}"
        self._dead_after_ms = int(settings.presence_dead_after_seconds * 1000)
        self._script = Lua.of(scripts.PRESENCE)
        self._finalize = Lua.of(scripts.FINALIZE)
        self._reap = Lua.of(scripts.REAP)
        self._heartbeat = Lua.of(scripts.HEARTBEAT)
        self._silent = Lua.of(scripts.SILENT)
        self._grace_done = Lua.of(scripts.GRACE_DONE)
        self.sockets: dict[tuple[str, str], int] = {}  # (stream, user) -> sockets on this replica
        self._users_in: dict[str, int] = {}  # stream -> users with sockets on this replica
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_event = asyncio.Event()
        # Who hears each join and leave this replica decides (`RedisBroker.watch_presence`).
        self.watch: PresenceWatch | None = None
        self.user_rules = _NO_RULES

    # ---- writes

    def set(self, stream: str, user_id: str, sockets: int) -> None:
        """Record in the background (a user's own stream)."""
        self._remember(stream, user_id, sockets)
        self._dirty.add((stream, user_id))
        self._dirty_event.set()

    async def join(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> int:
        """Record now (a topic); answers the distinct members across replicas."""
        previous = self.sockets.get((stream, user_id), 0)
        self._remember(stream, user_id, sockets)
        try:
            status, count = await self._write(stream, user_id, sockets, rules)
        except _FAILURES as exc:
            self._remember(stream, user_id, previous)
            raise BrokerUnavailable(f"Redis is unavailable: {type(exc).__name__}") from None
        if status == 1:
            self._remember(stream, user_id, previous)
            raise TopicFull(stream)
        return int(count)

    def _remember(self, stream: str, user_id: str, sockets: int) -> None:
        had = (stream, user_id) in self.sockets
        if sockets:
            self.sockets[(stream, user_id)] = sockets
            if not had:
                self._users_in[stream] = self._users_in.get(stream, 0) + 1
        elif had:
            del self.sockets[(stream, user_id)]
            left = self._users_in.pop(stream) - 1
            if left:
                self._users_in[stream] = left

    async def _write(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> tuple[int, int]:
        topic = topic_of(stream)
        keys = [self._key(stream, "m"), self._key(stream, f"m:{self._replica}"), self._key(stream, "g")]
        keys.append(self._key(stream, "c"))
        args = [user_id, sockets, int(rules.events), rules.grace_ms, rules.max_members or 0]
        args += [orjson.dumps(topic or "").decode(), self._ttl_ms, self._watched]
        streams_key = self._streams_of.format(self._replica)
        # The script and the note of which streams this replica is in leave in one write.
        calls = [self._pipeline.evaluate(self._script, keys, args)]
        if sockets:
            calls.append(self._pipeline.execute(command("SADD", streams_key, stream), key=streams_key))
        elif stream not in self._users_in:
            calls.append(self._pipeline.execute(command("SREM", streams_key, stream), key=streams_key))
        (status, count, due, changes), *_ = await asyncio.gather(*calls)
        self._heard(stream, changes)
        if status == 2:
            # A leave waits for its grace; whichever replica sweeps first after it tells the members.
            await self._pipeline.execute(command("ZADD", self._graces, "LT", due, stream), key=self._graces)
        return int(status), int(count)

    def _rules_for(self, stream: str) -> StreamRules:
        return self._rules(stream) if is_topic(stream) else self.user_rules

    @property
    def _watched(self) -> int:
        return int(self.watch is not None)

    def _heard(self, stream: str, changes: list[Any]) -> None:
        if self.watch is not None:
            for i in range(0, len(changes), 3):
                self.watch(stream, changes[i], changes[i + 1], int(changes[i + 2]))

    async def members(self, stream: str, limit: int) -> tuple[list[str], int]:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hlen(self._key(stream, "m"))
        pipe.hkeys(self._key(stream, "m"))
        count, users = await pipe.execute()
        return sorted(users)[:limit], int(count)

    async def online(self, stream: str) -> int:
        user_id = user_of(stream)
        return int(await self._redis.hget(self._key(stream, "m"), user_id or "") or 0)

    # ---- background

    async def write_forever(self) -> None:
        """Write changed socket counts to Redis in the background (users' own streams, leaves from
        topics, and everything after a rewrite), batched into one pipelined write."""
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(0.01)  # let a burst of connects coalesce into one batch
            self._dirty_event.clear()
            dirty, self._dirty = self._dirty, set()
            batch = list(dirty)
            try:
                async with asyncio.timeout(self._settings.publish_timeout_seconds * 4):
                    outcomes = await asyncio.gather(
                        *(self._write(s, u, self.sockets.get((s, u), 0), self._rules_for(s)) for s, u in batch),
                        return_exceptions=True,
                    )
            except TimeoutError:
                outcomes = [TimeoutError()] * len(batch)
            failed = {entry for entry, outcome in zip(batch, outcomes, strict=True) if isinstance(outcome, Exception)}
            if failed:  # Redis is away: only these are written again, once it is back
                logger.debug("presence: %d writes failed, retried", len(failed))
                self._dirty |= failed
                self._dirty_event.set()
                await asyncio.sleep(1.0)

    async def beat(self) -> None:
        """Say this replica is alive; if the others had reaped it (or Redis lost its data), write
        all of its presence again. Then reap the dead and tell the leaves that are due."""
        if await self._pipeline.evaluate(self._heartbeat, [self._replicas], [self._replica]):
            self.rewrite()
        for dead in await self._pipeline.evaluate(self._silent, [self._replicas], [self._dead_after_ms]):
            if dead != self._replica:
                await self._reap_replica(dead)
        await self._sweep_graces()

    def rewrite(self) -> None:
        """Everything this replica holds goes to Redis again (topics too: their members see joins)."""
        self._dirty.update(self.sockets)
        self._dirty_event.set()

    async def _reap_replica(self, dead: str) -> None:
        if not await self._redis.set(self._claim.format(dead), self._replica, nx=True, px=_CLAIM_MS):
            return  # another replica is on it
        streams_key = self._streams_of.format(dead)
        reaped = 0
        async for stream in self._redis.sscan_iter(streams_key, count=500):
            rules = self._rules_for(stream)
            keys = [self._key(stream, "m"), self._key(stream, f"m:{dead}"), self._key(stream, "g")]
            keys.append(self._key(stream, "c"))
            args = ["", "", int(rules.events), "", "", orjson.dumps(topic_of(stream) or "").decode(), "", self._watched]
            taken, changes = await self._pipeline.evaluate(self._reap, keys, args)
            reaped += int(taken)
            self._heard(stream, changes)
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(streams_key)
        pipe.zrem(self._replicas, dead)
        await pipe.execute()
        logger.warning("replica %s stopped beating: took its %d memberships out of presence", dead, reaped)

    async def _sweep_graces(self) -> None:
        now = await self._redis.time()
        now_ms = now[0] * 1000 + now[1] // 1000
        for stream, due in await self._redis.zrangebyscore(self._graces, "-inf", now_ms, withscores=True):
            rules = self._rules(stream)
            keys = [self._key(stream, "m"), self._key(stream, "m"), self._key(stream, "g"), self._key(stream, "c")]
            args = ["", "", int(rules.events), "", "", orjson.dumps(topic_of(stream) or "").decode(), "", self._watched]
            following, changes = await self._pipeline.evaluate(self._finalize, keys, args)
            following = int(following)
            self._heard(stream, changes)
            if following:
                await self._redis.zadd(self._graces, {stream: following}, xx=True)
            else:
                await self._pipeline.evaluate(self._grace_done, [self._graces], [stream, int(due)])

    async def forget(self) -> None:
        """On a clean stop: this replica's sockets are gone from every stream (topics' leaves wait
        for their grace, told by the replicas that remain)."""
        with contextlib.suppress(*_FAILURES):
            async with asyncio.timeout(self._settings.publish_timeout_seconds * 2):
                held, self.sockets = list(self.sockets), {}
                await asyncio.gather(*(self._write(s, u, 0, self._rules_for(s)) for s, u in held))
                await self._redis.zrem(self._replicas, self._replica)
