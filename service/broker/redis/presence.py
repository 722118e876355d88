"""Presence in Redis: who has sockets in which stream, on which replica, summed across replicas.

Per stream (a user's, or a topic) Redis keeps `members` (user -> sockets on every replica) and,
per replica, `members:<replica>` (user -> sockets there), so the sum survives any one replica:
- a user's own stream is written in the background, batched, except a user's first socket on this
  replica, written before its welcome (it feeds `online` in a publish's answer, which must count a
  welcomed socket); a topic is written at once, because a join answers the member count;
- what this replica holds (`sockets`) is the truth Redis is brought back to: a write that failed,
  was cancelled or passed its deadline may still have landed, so it is written again, as it now is;
- a user's last socket leaving a topic starts a grace; joins and leaves are announced once per
  interval per topic. A global sorted set lists the streams waiting for either, and upkeep.py
  sweeps it, one replica per stream.
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

FAILURES = (RedisError, OSError, TimeoutError)
_NO_RULES = StreamRules()
_WRITE_CHUNK = 1000

KeyOf = Callable[[str, str], str]


class PresenceKeys:
    """The keys and arguments every presence script of one stream takes (scripts.py's order)."""

    def __init__(self, settings: Settings, key: KeyOf, prefix: str, rules: RulesOf) -> None:
        self._key = key
        self._rules = rules
        self.ttl_ms = settings.history_ttl_seconds * 1000
        self.interval_ms = int(settings.presence_event_interval_seconds * 1000)
        self.limit = settings.join_leave_max_members
        # While someone watches presence (`RedisBroker.watch_presence`: the webhooks), every script
        # also returns the joins and leaves it decided, and users' own streams get a leave grace.
        self.watched = 0
        self.user_rules = _NO_RULES
        self.due = f"{prefix}:leaving"  # streams waiting for the sweep (the name predates announcements)
        self.streams_of = f"{prefix}:replica:{{0}}:streams"  # the streams a replica has members in

    def rules(self, stream: str) -> StreamRules:
        return self._rules(stream) if is_topic(stream) else self.user_rules

    def keys(self, stream: str, replica: str) -> list[str]:
        key = self._key
        return [key(stream, "m"), key(stream, f"m:{replica}"), key(stream, "g"), key(stream, "c")] + [
            key(stream, "e"),
            key(stream, "ed"),
        ]

    def sweep_args(self, stream: str) -> list[str | int]:
        """ANNOUNCE's and REAP's arguments."""
        topic = orjson.dumps(topic_of(stream) or "").decode()
        events = int(self.rules(stream).events)
        return ["", "", events, "", "", topic, self.ttl_ms, self.interval_ms, self.limit, self.watched]


class Presence:
    """This replica's share of presence, written to Redis."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        pipeline: AutoPipeline | ClusterPipelines,
        keys: PresenceKeys,
        replica_id: str,
    ) -> None:
        self._settings = settings
        self._redis = redis
        # Presence writes share the publishes' pipelined connection: a burst of joins or a rewrite
        # of every member is one write, never a pool connection each.
        self._pipeline = pipeline
        self._keys = keys
        self._replica = replica_id
        self._streams_key = keys.streams_of.format(replica_id)
        self._script = Lua.of(scripts.PRESENCE)
        self._due = Lua.of(scripts.DUE)
        self.sockets: dict[tuple[str, str], int] = {}  # (stream, user) -> sockets on this replica
        self._users_in: dict[str, int] = {}  # stream -> users with sockets on this replica
        self._dirty: set[tuple[str, str]] = set()
        self._dirty_event = asyncio.Event()
        self.watch: PresenceWatch | None = None  # who hears each join and leave this replica decides

    def watch_with(self, watch: PresenceWatch, user_grace_ms: int) -> None:
        self.watch = watch
        self._keys.watched = 1
        self._keys.user_rules = StreamRules(grace_ms=user_grace_ms)

    def heard(self, stream: str, changes: list[Any]) -> None:
        """Tell the watcher what a script decided: (action, user, members after) triples."""
        if self.watch is not None:
            for i in range(0, len(changes), 3):
                self.watch(stream, changes[i], changes[i + 1], int(changes[i + 2]))

    # ---- writes

    def set(self, stream: str, user_id: str, sockets: int) -> None:
        """Record in the background (a user's own stream, a leave, an undone join)."""
        self._remember(stream, user_id, sockets)
        self._again(stream, user_id)

    def _again(self, stream: str, user_id: str) -> None:
        """Have the background writer write the stream's entry for the user, as it then is."""
        self._dirty.add((stream, user_id))
        self._dirty_event.set()

    async def record(self, stream: str, user_id: str, sockets: int, within: float) -> None:
        """Record now (a user's first socket here: the background's batching would let a publish
        made right after the welcome count the user offline). A write that failed or passed
        `within` is left to the background, which brings Redis back to what this replica holds."""
        self._remember(stream, user_id, sockets)
        try:
            async with asyncio.timeout(within):
                _, _, noted = await self._write(stream, user_id, sockets, self._keys.rules(stream))
        except (*FAILURES, BrokerUnavailable):
            noted = False  # it may still have landed: written again as it then is
        except BaseException:  # cancelled: the same, and the caller undoes its socket
            self._again(stream, user_id)
            raise
        if not noted:
            self._again(stream, user_id)

    async def join(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> int:
        """Record now (a topic); answers the distinct members across replicas."""
        previous = self.sockets.get((stream, user_id), 0)
        self._remember(stream, user_id, sockets)
        try:
            status, count, noted = await self._write(stream, user_id, sockets, rules)
        except BaseException as exc:
            # Failed, cancelled or past its deadline: the script may still have run (or run later,
            # from Redis's input buffer). Redis is brought back to what this replica holds.
            self.set(stream, user_id, previous)
            if isinstance(exc, FAILURES):
                raise BrokerUnavailable(f"Redis is unavailable: {type(exc).__name__}") from None
            raise
        if status == 1:
            self._remember(stream, user_id, previous)
            raise TopicFull(stream)
        if not noted:  # the presence itself is written: only the note is written again, in the background
            self._again(stream, user_id)
        return count

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

    async def _write(self, stream: str, user_id: str, sockets: int, rules: StreamRules) -> tuple[int, int, bool]:
        """Run the presence script, and note which streams this replica is in: (status, members,
        whether the note was written too). Raises when the script failed (it may still have run)."""
        keys = self._keys
        args = [user_id, sockets, int(rules.events), rules.grace_ms, rules.max_members or 0]
        args += [orjson.dumps(topic_of(stream) or "").decode(), keys.ttl_ms, keys.interval_ms, keys.limit, keys.watched]
        # The script and the note of which streams this replica is in leave in one write.
        calls = [self._pipeline.evaluate(self._script, keys.keys(stream, self._replica), args)]
        if sockets:
            calls.append(self._pipeline.execute(command("SADD", self._streams_key, stream), key=self._streams_key))
        elif stream not in self._users_in:
            calls.append(self._pipeline.execute(command("SREM", self._streams_key, stream), key=self._streams_key))
        outcome, *note = await asyncio.gather(*calls, return_exceptions=True)
        if isinstance(outcome, BaseException):
            raise outcome
        noted = not (note and isinstance(note[0], BaseException))
        status, count, due, changes = outcome
        self.heard(stream, changes)
        if due:
            # A leave waits for its grace, an announcement for its interval: whichever replica
            # claims the stream once it is due finishes them.
            await self._pipeline.evaluate(self._due, [keys.due], [stream, int(due), ""])
        return int(status), int(count), noted

    async def members(self, stream: str, limit: int) -> tuple[list[str], int]:
        """The count, and up to `limit` members (which ones, of a larger topic, is Redis's scan
        order): a read whose cost is bounded by `limit`, not by the topic's size."""
        key = self._keys.keys(stream, self._replica)[0]
        count, users, cursor = await self._redis.hlen(key), set(), 0
        while True:
            cursor, page = await self._redis.hscan(key, cursor, count=limit)
            users.update(page)
            if not cursor or len(users) >= limit:
                break
        return sorted(users)[:limit], int(count)

    async def online(self, stream: str) -> int:
        user_id = user_of(stream)
        return int(await self._redis.hget(self._keys.keys(stream, self._replica)[0], user_id or "") or 0)

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
            outcomes: list[Any] = []
            # A chunk at a time: tens of thousands of leaves (sockets in 64 topics closing together)
            # in one go would hold the event loop, and the probe and `/readyz` with it, for seconds.
            for start in range(0, len(batch), _WRITE_CHUNK):
                outcomes += await self._write_chunk(batch[start : start + _WRITE_CHUNK])
            failed = {
                entry
                for entry, outcome in zip(batch, outcomes, strict=True)
                if isinstance(outcome, Exception) or not outcome[2]
            }
            if failed:  # Redis is away: only these are written again, once it is back
                logger.debug("presence: %d writes failed, retried", len(failed))
                self._dirty |= failed
                self._dirty_event.set()
                await asyncio.sleep(1.0)

    async def _write_chunk(self, chunk: list[tuple[str, str]]) -> list[Any]:
        try:
            async with asyncio.timeout(self._settings.publish_timeout_seconds * 4):
                return await asyncio.gather(
                    *(self._write(s, u, self.sockets.get((s, u), 0), self._keys.rules(s)) for s, u in chunk),
                    return_exceptions=True,
                )
        except TimeoutError:
            return [TimeoutError()] * len(chunk)

    def rewrite(self) -> None:
        """Everything this replica holds goes to Redis again (topics too: their members see joins)."""
        self._dirty.update(self.sockets)
        self._dirty_event.set()

    async def forget(self) -> None:
        """On a clean stop: this replica's sockets are gone from every stream (topics' leaves wait
        for their grace, told by the replicas that remain)."""
        with contextlib.suppress(*FAILURES):
            async with asyncio.timeout(self._settings.publish_timeout_seconds * 2):
                held, self.sockets = list(self.sockets), {}
                await asyncio.gather(*(self._write(s, u, 0, self._keys.rules(s)) for s, u in held))
