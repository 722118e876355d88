"""Redis Cluster: which primary owns a key, and publishes routed to it on its own pipelined connection.

Every key and channel of one stream shares the stream's hash tag, so one slot, so one primary
runs its script. Each primary gets an AutoPipeline of its own (the same raw pipelined connection
as with one Redis). A `-MOVED` (the slot has a new owner), an `-ASK` (it is being moved, and these
keys already went) and a `-TRYAGAIN` (they are half way) all mean the command did not run: the
map is refreshed and the command sent where it belongs now. A connection that breaks makes the map
refresh too, since a failover is the likely cause; what was in flight answers 503 (it may have run).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from .pipeline import AutoPipeline, Lua

logger = logging.getLogger("service.broker")

Address = tuple[str, int]
_REDIRECTS = 4
_REFRESH_INTERVAL = 0.1


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


class SlotMap:
    """Slot -> primary, as redis-py's cluster client knows it; refreshed on demand, at most every
    100 ms, with everyone who asks meanwhile waiting for the same refresh."""

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._refreshing: asyncio.Task[None] | None = None
        self._last = 0.0
        self.listeners: list[Callable[[], None]] = []

    async def start(self) -> None:
        await self._client.initialize()

    def owner(self, slot: int) -> Address:
        node = self._client.nodes_manager.get_node_from_slot(slot)
        return node.host, int(node.port)

    def primaries(self) -> list[Address]:
        return sorted({(n.host, int(n.port)) for n in self._client.get_primaries()})

    def slots_of(self, address: Address) -> list[tuple[int, int]]:
        """The slot ranges a primary owns."""
        table = self._client.nodes_manager.slots_cache
        ranges: list[tuple[int, int]] = []
        for slot in range(len(table) if isinstance(table, list) else 16384):
            nodes = table[slot] if isinstance(table, list) else table.get(slot)
            if nodes and (nodes[0].host, int(nodes[0].port)) == address:
                if ranges and ranges[-1][1] == slot - 1:
                    ranges[-1] = (ranges[-1][0], slot)
                else:
                    ranges.append((slot, slot))
        return ranges

    async def refresh(self) -> None:
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(task)

    def suspect(self) -> None:
        """Something broke the way a failover would: refresh soon, without waiting for it."""
        task = self._refreshing
        if task is None or task.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            self._refreshing.add_done_callback(_quiet)

    async def _refresh(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._last + _REFRESH_INTERVAL - loop.time()))
        self._last = loop.time()
        before = {slot: self._owner_or_none(slot) for slot in (0, 8191, 16383)}
        await self._client.nodes_manager.initialize()
        after = {slot: self._owner_or_none(slot) for slot in (0, 8191, 16383)}
        if before != after:
            logger.info("redis cluster: primaries are now %s", ", ".join(f"{h}:{p}" for h, p in self.primaries()))
        for listener in self.listeners:
            listener()

    def _owner_or_none(self, slot: int) -> Address | None:
        try:
            return self.owner(slot)
        except Exception:  # noqa: BLE001 - a slot without an owner while the cluster heals
            return None


class ClusterPipelines:
    """AutoPipeline's interface, each command routed to the primary that owns its key."""

    def __init__(self, slots: SlotMap, make: Callable[[Address], AutoPipeline]) -> None:
        self._slots = slots
        self._make = make
        self._pipelines: dict[Address, AutoPipeline] = {}

    def _pipeline(self, address: Address) -> AutoPipeline:
        pipeline = self._pipelines.get(address)
        if pipeline is None:
            pipeline = self._pipelines[address] = self._make(address)
        return pipeline

    async def execute(
        self, command: bytes, acknowledged: bool = False, key: str | None = None, asking: bool = False
    ) -> Any:
        assert key is not None, "in a cluster every command names the key it is routed by"
        # Straight to the owner's pipeline: every publish comes this way, and a redirect is rare.
        try:
            return await self._owner_pipeline(key).execute(command, acknowledged, asking=asking)
        except ResponseError as exc:
            if not _redirect(exc):
                raise
            first = exc
        return await self._rerouted(key, first, lambda pipe, ask: pipe.execute(command, acknowledged, asking=ask))

    async def evaluate(
        self,
        script: Lua,
        keys: Sequence[str],
        args: Sequence[str | int],
        acknowledged: bool = False,
        asking: bool = False,
    ) -> Any:
        try:
            return await self._owner_pipeline(keys[0]).evaluate(script, keys, args, acknowledged, asking)
        except ResponseError as exc:
            if not _redirect(exc):
                raise
            first = exc
        return await self._rerouted(
            keys[0], first, lambda pipe, ask: pipe.evaluate(script, keys, args, acknowledged, ask)
        )

    def _owner_pipeline(self, key: str) -> AutoPipeline:
        slot = slot_of(key)
        try:
            address = self._slots.owner(slot)
        except Exception as exc:  # noqa: BLE001 - no map yet, or the slot has no primary right now
            self._slots.suspect()
            raise RedisConnectionError(f"no primary known for slot {slot}") from exc
        return self._pipeline(address)

    async def _rerouted(
        self, key: str, redirect: ResponseError, call: Callable[[AutoPipeline, bool], Awaitable[Any]]
    ) -> Any:
        """Follow a redirect (and any that follow it) to where the key's slot is now."""
        slot = slot_of(key)
        for _ in range(_REDIRECTS):
            kind, _, rest = str(redirect).partition(" ")
            if kind == "MOVED":
                await self._slots.refresh()
                address, asking = _address(rest), False
            elif kind == "ASK":
                address, asking = _address(rest), True
            else:  # TRYAGAIN, CLUSTERDOWN: half way through a move, or healing
                await asyncio.sleep(0.05)
                address, asking = self._slots.owner(slot), False
            try:
                return await call(self._pipeline(address), asking)
            except ResponseError as exc:
                if not _redirect(exc):
                    raise
                redirect = exc
        raise ConnectionError(f"slot {slot} kept moving")

    async def aclose(self) -> None:
        await asyncio.gather(*(pipeline.aclose() for pipeline in self._pipelines.values()))

    def drop_link(self, reason: str, keep: Callable[[Any], bool]) -> None:
        for pipeline in self._pipelines.values():
            pipeline.drop_link(reason, keep)


_REDIRECT_KINDS = frozenset({"MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"})


def _redirect(exc: ResponseError) -> bool:
    """The command did not run here: the slot moved, is moving, or the cluster is healing."""
    return str(exc).partition(" ")[0] in _REDIRECT_KINDS


def _address(redirect: str) -> Address:
    """The node of a `-MOVED 3999 127.0.0.1:6381` or `-ASK ...` reply (after the kind)."""
    host, _, port = redirect.split(" ")[-1].rpartition(":")
    return host, int(port)


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.debug("redis cluster: refreshing the slot map failed: %s", task.exception())
