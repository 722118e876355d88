"""RedisOutbox: the queue every replica shares, spread over hash-tagged shards.

A job lives in one shard, chosen from its order key (so one stream's jobs keep their order), and
every step on it is one script on that shard's keys (scripts.py). A claim leases jobs to this
replica; a replica that dies holding some loses the lease, and the next claim by anyone after it
ran out takes them. Scripts go through the broker's pipelined connections, routed to the primary
that owns the shard's slot: the same code on one Redis, under Sentinel and on a Cluster.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import zlib
from collections.abc import Sequence
from typing import Any

from ..broker.redis.broker import RedisBroker
from . import scripts
from .base import DEAD_KEPT, DestinationStats, Job, Waker, new_id, retry_delay, shard_of

# Enough tags that no one slot (so no one primary of a cluster) carries every job.
SHARDS = 8
# A claimed job is another replica's to take once this much longer than an attempt may last has
# passed: a SIGKILLed replica's jobs go on within 30 s at the default attempt timeout.
LEASE_MARGIN_SECONDS = 10.0
PENDING_READ_SECONDS = 1.0
_STAT_FIELDS = {"p": "pending", "d": "delivered", "f": "failed", "x": "dead"}


class RedisOutbox(Waker):
    def __init__(
        self,
        broker: RedisBroker,
        delays: tuple[float, ...],
        max_pending: int,
        attempt_seconds: float,
        tag: str = "ob",
    ) -> None:
        super().__init__()
        self._broker = broker
        self._tag = tag  # each outbox its own keys: one's dispatcher never claims another's jobs
        self._delays = delays
        # A destination's jobs are spread over the shards, so its pending count is their sum: read
        # at most once a second (and counted up locally between reads), so the bound is exact
        # within what every replica enqueues in a second. Each shard also refuses past the bound.
        self._max_pending = max_pending
        self._pending: dict[str, int] = {}
        self._pending_read = -PENDING_READ_SECONDS
        self._reading: asyncio.Task[Any] | None = None
        self._lease_ms = int((attempt_seconds + LEASE_MARGIN_SECONDS) * 1000)
        self._prefix = broker.prefix
        self._next = 0  # the shard the next claim starts at, so none is always served last

    def _keys(self, shard: int, *names: str) -> list[str]:
        return [f"{self._prefix}:{{{self._tag}{shard}}}:{name}" for name in names]

    async def _run(self, script: Any, shard: int, names: Sequence[str], args: Sequence[str | int]) -> Any:
        return await self._broker.evaluate(script, self._keys(shard, *names), args)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def enqueue(self, destination: str, payload: str, order_key: str) -> str | None:
        if self._max_pending:
            self._read_pending()
            if self._pending.get(destination, 0) >= self._max_pending:
                return None
        shard = zlib.crc32(order_key.encode()) % SHARDS
        job_id = new_id(shard)
        # The script is this call's first wait, so jobs enqueued one after another reach Redis in that order.
        args = (job_id, destination, payload, self._max_pending)
        queued = await self._run(scripts.ENQUEUE, shard, ("due", "jobs", "meta", "stats"), args)
        if not queued:
            return None
        self._pending[destination] = self._pending.get(destination, 0) + 1
        self.wake()
        return job_id

    def _read_pending(self) -> None:
        """Read the pending counts again in the background when they are a second old."""
        if time.monotonic() - self._pending_read < PENDING_READ_SECONDS:
            return
        if self._reading is None or self._reading.done():
            self._reading = asyncio.get_running_loop().create_task(self.stats())
            self._reading.add_done_callback(_quiet)

    async def claim(self, limit: int) -> list[Job]:
        token = secrets.token_hex(8)
        each = max(1, -(-limit // SHARDS))
        start, self._next = self._next, (self._next + 1) % SHARDS
        order = [(start + i) % SHARDS for i in range(SHARDS)]
        replies = await asyncio.gather(
            *(
                self._run(scripts.CLAIM, s, ("due", "lease", "jobs", "meta"), (each, self._lease_ms, token))
                for s in order
            )
        )
        jobs = []
        for reply in replies:
            for i in range(0, len(reply), 6):
                job_id, attempts, created, destination, error, payload = reply[i : i + 6]
                jobs.append(Job(job_id, destination, payload, int(created), int(attempts), error, token))
        return jobs  # a little over `limit` at most: a claimed job is never left unreturned

    async def complete(self, job: Job) -> None:
        shard = _shard(job.id)
        names = ("due", "lease", "dead", "jobs", "meta", "stats")
        await self._run(scripts.COMPLETE, shard, names, (job.id, job.destination))

    async def fail(self, job: Job, error: str, not_before: float = 0.0) -> bool:
        delay = retry_delay(self._delays, job.attempts + 1, not_before)
        if delay is None:
            await self.bury(job, error)
            return False
        args = (job.id, job.claim, error, int(delay * 1000))
        await self._run(scripts.RETRY, _shard(job.id), ("lease", "due", "meta", "stats"), args)
        return True

    async def bury(self, job: Job, error: str) -> None:
        args = (job.id, job.claim, error, DEAD_KEPT)
        await self._run(scripts.BURY, _shard(job.id), ("lease", "dead", "meta", "stats", "jobs"), args)

    async def release(self, job: Job, delay: float = 0.0) -> None:
        args = (job.id, job.claim, int(delay * 1000))
        await self._run(scripts.RELEASE, _shard(job.id), ("lease", "due", "meta"), args)

    async def dead(self, limit: int) -> list[Job]:
        replies = await asyncio.gather(
            *(self._run(scripts.DEAD, s, ("dead", "meta", "jobs"), (limit,)) for s in range(SHARDS))
        )
        jobs = []
        for reply in replies:
            for i in range(0, len(reply), 4):
                job_id, died, meta, payload = reply[i : i + 4]
                attempts, created, _, destination, error = meta.split("|", 4)
                jobs.append(Job(job_id, destination, payload, int(created), int(attempts), error, "", int(died)))
        jobs.sort(key=lambda job: (job.died_ms, job.id), reverse=True)
        return jobs[:limit]

    async def replay(self, ids: Sequence[str] | None) -> int:
        by_shard: dict[int, list[str]] = {s: ["*"] for s in range(SHARDS)} if ids is None else {}
        for job_id in ids or ():
            shard = shard_of(job_id)
            if shard is not None and shard < SHARDS:
                by_shard.setdefault(shard, []).append(job_id)
        counts = await asyncio.gather(
            *(self._run(scripts.REPLAY, s, ("dead", "due", "meta", "stats"), chosen) for s, chosen in by_shard.items())
        )
        if any(counts):
            self.wake()
        return int(sum(counts))

    async def stats(self) -> dict[str, DestinationStats]:
        replies = await asyncio.gather(*(self._run(scripts.STATS, s, ("stats",), ()) for s in range(SHARDS)))
        found: dict[str, DestinationStats] = {}
        for reply in replies:
            for i in range(0, len(reply), 2):
                kind, _, destination = reply[i].partition(":")
                value: str = reply[i + 1]
                stats = found.get(destination)
                if stats is None:
                    stats = found[destination] = DestinationStats()
                if kind in _STAT_FIELDS:
                    name = _STAT_FIELDS[kind]
                    setattr(stats, name, getattr(stats, name) + int(value))
                elif kind == "s":
                    stats.last_success_ms = max(stats.last_success_ms or 0, int(value))
                elif kind == "e":
                    ms, _, error = value.partition("|")
                    if int(ms) > (stats.last_error_ms or 0):
                        stats.last_error, stats.last_error_ms = error, int(ms)
                elif kind == "z":
                    stats.paused = value
        self._pending = {destination: stats.pending for destination, stats in found.items()}
        self._pending_read = time.monotonic()
        return found

    async def pause(self, destination: str, reason: str) -> None:
        await self._run(scripts.SET_STAT, 0, ("stats",), ("z:" + destination, reason or "paused"))

    async def resume(self, destination: str) -> None:
        await self._run(scripts.SET_STAT, 0, ("stats",), ("z:" + destination, ""))


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # Redis away: the counts are read again on a later enqueue


def _shard(job_id: str) -> int:
    shard = shard_of(job_id)
    assert shard is not None, job_id
    return shard
