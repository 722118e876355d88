"""Presence upkeep, apart from the probe: heartbeats, reaping dead replicas, and the sweep.

- each replica beats every probe interval; one that stops beating for `dead_after` is reaped by
  whichever live replica claims it first: its sockets are taken out of every stream it had, and
  topic members are told of every user who had sockets only there;
- the sweep finishes what waits in the global sorted set of due streams: leaves whose grace is
  over, and announcements whose interval is over. A sweeper claims a batch of due streams (one
  replica sweeps each; a claim runs out if its sweeper dies) and runs them in one pipelined write.

Neither runs in the probe's task: a large sweep never delays the probe that keeps `/readyz` up,
and a slow probe never delays a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ...config.settings import Settings
from ...telemetry.metrics import Metrics
from . import scripts
from .cluster import ClusterPipelines
from .pipeline import AutoPipeline, Lua
from .presence import FAILURES, Presence, PresenceKeys

logger = logging.getLogger("service.broker")

_REAP_CLAIM_MS = 30_000
_SWEEP_CLAIM_MS = 10_000  # a sweeper that has not finished its batch by then is taken as gone
_SWEEP_BATCH = 500
_REAP_BATCH = 500


class Upkeep:
    """This replica's heartbeat, and its part in reaping and sweeping for all of them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        redis: Any,
        pipeline: AutoPipeline | ClusterPipelines,
        keys: PresenceKeys,
        presence: Presence,
        prefix: str,
        replica_id: str,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._redis = redis
        self._pipeline = pipeline
        self._keys = keys
        self._presence = presence
        self._replica = replica_id
        self._replicas = f"{prefix}:replicas"
        self._claim = f"{prefix}:reaping:{{0}}"
        self._dead_after_ms = int(settings.presence_dead_after_seconds * 1000)
        self._reap = Lua.of(scripts.REAP)
        self._heartbeat = Lua.of(scripts.HEARTBEAT)
        self._silent = Lua.of(scripts.SILENT)
        self._announce = Lua.of(scripts.ANNOUNCE)
        self._claim_due = Lua.of(scripts.CLAIM)
        self._due = Lua.of(scripts.DUE)
        # Often enough that an announcement is not much later than its interval.
        self._sweep_every = min(settings.probe_interval_seconds, settings.presence_event_interval_seconds) / 4

    async def beat_forever(self) -> None:
        interval = self._settings.probe_interval_seconds
        while True:
            try:
                async with asyncio.timeout(self._settings.publish_timeout_seconds * 4):
                    await self.beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: the next beat tries again
                logger.debug("presence heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    async def beat(self) -> None:
        """Say this replica is alive; if the others had reaped it (or Redis lost its data), write
        all of its presence again. Then reap the dead."""
        if await self._pipeline.evaluate(self._heartbeat, [self._replicas], [self._replica]):
            self._presence.rewrite()
        for dead in await self._pipeline.evaluate(self._silent, [self._replicas], [self._dead_after_ms]):
            if dead != self._replica:
                await self._reap_replica(dead)

    async def _reap_replica(self, dead: str) -> None:
        if not await self._redis.set(self._claim.format(dead), self._replica, nx=True, px=_REAP_CLAIM_MS):
            return  # another replica is on it
        streams_key = self._keys.streams_of.format(dead)
        reaped, batch = 0, []
        async for stream in self._redis.sscan_iter(streams_key, count=_REAP_BATCH):
            batch.append(stream)
            if len(batch) >= _REAP_BATCH:
                reaped += await self._reap_streams(dead, batch)
                batch = []
        reaped += await self._reap_streams(dead, batch)
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(streams_key)
        pipe.zrem(self._replicas, dead)
        await pipe.execute()
        logger.warning("replica %s stopped beating: took its %d memberships out of presence", dead, reaped)

    async def _reap_streams(self, dead: str, streams: list[str]) -> int:
        keys = self._keys
        outcomes = await asyncio.gather(
            *(self._pipeline.evaluate(self._reap, keys.keys(s, dead), keys.sweep_args(s)) for s in streams)
        )
        for s, (_, _, changes) in zip(streams, outcomes, strict=True):
            self._presence.heard(s, changes)
        await asyncio.gather(
            *(
                self._pipeline.evaluate(self._due, [keys.due], [s, int(due), ""])
                for s, (_, due, _) in zip(streams, outcomes, strict=True)
                if due
            )
        )
        return sum(int(reaped) for reaped, _, _ in outcomes)

    async def sweep_forever(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: claims run out, the sweep tries again
                self._metrics.broker_errors.inc()
                logger.debug("presence sweep failed: %s", exc)
            await asyncio.sleep(self._sweep_every)

    async def sweep(self) -> None:
        """Finish every due leave and announcement this replica claims, a batch per round trip."""
        keys = self._keys
        while True:
            async with asyncio.timeout(self._settings.publish_timeout_seconds * 4):
                claim, streams = await self._pipeline.evaluate(
                    self._claim_due, [keys.due], [_SWEEP_CLAIM_MS, _SWEEP_BATCH]
                )
                if not streams:
                    return
                self._metrics.presence_sweeps.inc(len(streams))
                nexts = await asyncio.gather(
                    *(
                        self._pipeline.evaluate(self._announce, keys.keys(s, self._replica), keys.sweep_args(s))
                        for s in streams
                    )
                )
                for s, (_, changes) in zip(streams, nexts, strict=True):
                    self._presence.heard(s, changes)
                await asyncio.gather(
                    *(
                        self._pipeline.evaluate(self._due, [keys.due], [s, int(due), int(claim)])
                        for s, (due, _) in zip(streams, nexts, strict=True)
                    )
                )
            if len(streams) < _SWEEP_BATCH:
                return

    async def forget(self) -> None:
        """On a clean stop: the others need not wait to reap this replica."""
        with contextlib.suppress(*FAILURES):
            async with asyncio.timeout(self._settings.publish_timeout_seconds):
                await self._redis.zrem(self._replicas, self._replica)
