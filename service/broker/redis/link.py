"""Link: one subscription connection to one Redis primary, holding the channels of the slots it owns.

It subscribes with SSUBSCRIBE (one per slot in a cluster), hands each message on through its
Subscription, which keeps the streams' positions, and rebuilds itself after any break: a broken
connection, a probe that did not come back, a channel Redis dropped (its slot moved), or a node
that is no longer the primary. A rebuild replays each of its streams' gaps from history.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ...config.settings import Settings
from ...core.ids import IdKey, id_key
from ...core.tasks import cancel_and_wait
from ...telemetry.metrics import Metrics
from ..base import FrameHandler, LostHandler, frame_id
from .cluster import SlotMap, slot_of
from .connector import Connector
from .resp import RawConnection, command

logger = logging.getLogger("service.broker")

_FAILURES = (RedisError, OSError, TimeoutError)
Address = tuple[str, int]
# Rounds of catching up with streams joined or left while a resubscription was in flight; after
# these, joins and leaves talk to Redis themselves and one last round covers what is left.
_CATCH_UP_ROUNDS = 10


class LinkOwner(Protocol):
    """What a link needs of the subscription that owns it (`Subscription`): the streams' positions,
    where to hand frames, and how to replay a gap; a link holds channels, its owner holds state."""

    settings: Settings
    metrics: Metrics
    connector: Connector
    key: Callable[[str, str], str]
    slots: SlotMap | None
    channel_head: int
    on_frame: FrameHandler | None
    on_lost: LostHandler | None
    restarted: Callable[[], None]
    positions: dict[str, IdKey]

    def link_broke(self) -> None: ...

    async def read_positions(self, streams: list[str]) -> None: ...

    async def replay_gaps(self, streams: list[str]) -> None: ...

    def probe_channel_for(self, address: Address) -> str: ...


class Link:
    """One subscription connection to one primary."""

    def __init__(self, owner: LinkOwner, address: Address, client: aioredis.Redis) -> None:
        self._owner = owner
        self.address = address
        self._client = client
        self.streams: set[str] = set()
        self.probe_channel = ""
        self._pubsub: RawConnection | None = None
        self._probe_timer: asyncio.TimerHandle | None = None
        self._lost_because: str | None = None  # why the connection was dropped, if we dropped it
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._unsubscribing: dict[str, int] = {}  # channels we asked to leave, still to be confirmed
        self._early: list[Any] = []  # replies read while confirming, for `_read_messages`
        self._adopted: set[str] = set()  # streams moved here, whose gap is replayed once subscribed
        self.subscribed = False
        self.last_probe = float("-inf")
        self._lineage: tuple[str, str] | None = None  # the data's replication ids, to tell a failover from a loss
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run_forever(), name=f"redis-subscription-{self.address}"
        )

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self.close()
        await self._client.aclose()

    @property
    def ready(self) -> bool:
        fresh = time.monotonic() - self.last_probe < self._owner.settings.probe_timeout_seconds
        return self.subscribed and fresh and self._owner.connector.serves(self._pubsub)

    def primary_changed(self) -> None:
        pubsub = self._pubsub
        if pubsub is not None and not self._owner.connector.serves(pubsub):
            self._lost_because = "the Redis primary changed"
            pubsub.abort()

    async def subscribe(self, stream: str) -> None:
        self.streams.add(stream)
        if not self._subscribable({stream}):
            return
        if self._pubsub is None or not self.subscribed:
            # The next (re)subscription includes it, and replays what was published after this
            # position: a client resuming meanwhile reads history only up to about here.
            await self._owner.read_positions([stream])
            return
        channel = self._owner.key(stream, "c")
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[channel] = confirmed
        try:
            self._pubsub.write(command("SSUBSCRIBE", channel))
            async with asyncio.timeout(self._owner.settings.probe_timeout_seconds):
                await confirmed
        except _FAILURES:
            # The loop notices a broken link and resubscribes every stream it holds.
            self._confirmations.pop(channel, None)
            if not confirmed.done():
                confirmed.cancel()
        except asyncio.CancelledError:
            # The caller was cancelled (its client left): the stream stays for the loop to handle.
            if self._confirmations.get(channel) is confirmed:
                del self._confirmations[channel]
            raise
        await self._owner.read_positions([stream])

    def _subscribable(self, streams: set[str]) -> set[str]:
        """The streams whose channel can be written. One that cannot (a name that is not valid
        UTF-8) is dropped and logged: it must not keep every other stream from (re)subscribing."""
        bad = set()
        for stream in streams:
            try:
                self._owner.key(stream, "c").encode()
            except UnicodeEncodeError:
                bad.add(stream)
        for stream in bad:
            self.streams.discard(stream)
            self._adopted.discard(stream)
            logger.error("stream %r dropped: its channel name is not valid UTF-8", stream)
        return streams - bad

    def adopt(self, stream: str) -> None:
        """A stream whose slot moved here: subscribed, and its gap replayed from its position."""
        self.streams.add(stream)
        self._adopted.add(stream)
        if self._pubsub is not None and self.subscribed:
            self._lost_because = "streams moved to this primary"
            self._pubsub.abort()  # rebuilt at once, with the gap of every stream it holds replayed

    def unsubscribe(self, stream: str, quietly: bool = False) -> None:
        held = stream in self.streams
        self.streams.discard(stream)
        self._adopted.discard(stream)
        if held and self._pubsub is not None and self.subscribed:
            channel = self._owner.key(stream, "c")
            try:
                self._pubsub.write(command("SUNSUBSCRIBE", channel))
            except _FAILURES:
                return
            self._unsubscribing[channel] = self._unsubscribing.get(channel, 0) + 1

    # ---- the loop

    async def _run_forever(self) -> None:
        """Keep the link alive; on any break, rebuild it and replay each stream's gap."""
        attempt = 0
        owner = self._owner
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
                owner.metrics.broker_errors.inc()
            self.subscribed = False
            self.close()
            owner.link_broke()
            attempt += 1
            owner.metrics.broker_reconnects.inc()
            # Capped exponential backoff with full jitter: replicas do not stampede a returning Redis.
            # Cut short when Sentinel names a new primary: the retry then has somewhere to go.
            cap = min(owner.settings.reconnect_max_seconds, 0.1 * 2 ** min(attempt, 10))
            await owner.connector.pause(random.uniform(cap / 2, cap))

    async def _subscribe_all(self) -> None:
        owner = self._owner
        self._early = []
        self._lost_because = None
        streams = self._subscribable(set(self.streams))
        async with asyncio.timeout(owner.settings.probe_timeout_seconds):
            pubsub = self._pubsub = await RawConnection.open(self._client)
            self.probe_channel = owner.probe_channel_for(self.address)
            await self._ssubscribe(pubsub, [self.probe_channel, *(owner.key(s, "c") for s in streams)])
            info = await self._client.info("replication")
            # Streams joined or left while this ran: `subscribe`/`unsubscribe` left them to us.
            for round_ in range(1, _CATCH_UP_ROUNDS + 1):
                added, removed = self.streams - streams, streams - self.streams
                if not added and not removed:
                    break
                if round_ == _CATCH_UP_ROUNDS:
                    # Joins keep coming: from here on they subscribe themselves (their replies
                    # wait in `_early`), so this last round's set cannot grow while it is sent.
                    self.subscribed = True
                added = self._subscribable(added)
                streams = set(self.streams)
                for stream in removed:
                    pubsub.write(command("SUNSUBSCRIBE", owner.key(stream, "c")))
                if added:
                    await self._ssubscribe(pubsub, [owner.key(s, "c") for s in added])
            self.subscribed = True  # from here on, `subscribe` and `unsubscribe` talk to Redis themselves
            self.last_probe = time.monotonic()
        # A promoted replica carries on its old primary's replication id (as replid2); a Redis that
        # restarted, having lost or reloaded its data, starts a new one.
        lineage = (str(info.get("master_replid")), str(info.get("master_replid2")))
        restarted = self._lineage is not None and self._lineage[0] not in lineage
        self._lineage = lineage
        if restarted:
            # Redis lost its data: nothing to replay from, every id sequence starts again.
            for stream in streams:
                owner.positions.pop(stream, None)
            owner.restarted()
            if owner.on_lost is not None:
                await owner.on_lost()
        self._adopted.clear()
        streams = set(self.streams)
        await owner.replay_gaps([s for s in streams if s in owner.positions])
        await owner.read_positions([s for s in streams if s not in owner.positions])
        logger.info("redis subscription ready: %d streams", len(streams))

    async def _ssubscribe(self, pubsub: RawConnection, channels: list[str]) -> None:
        if self._owner.slots is None:
            pubsub.write(command("SSUBSCRIBE", *channels))
        else:
            # A cluster takes one slot per SSUBSCRIBE.
            by_slot: dict[int, list[str]] = defaultdict(list)
            for channel in channels:
                by_slot[slot_of(channel)].append(channel)
            pubsub.write(b"".join(command("SSUBSCRIBE", *group) for group in by_slot.values()))
        await self._confirm(pubsub, set(channels))

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
        batch, self._early = self._early, []
        self._watch_probe(pubsub)
        try:
            # Messages are delivered as they arrive, from the connection's own read callback (resp.py);
            # this task only waits to hear why the connection ended.
            receive = self._receiver()
            if batch:
                receive(batch)  # replies met while subscribing, before any that follow them
            pubsub.sink(receive)
            await pubsub.broken()
        except _FAILURES:
            if self._lost_because is not None:
                raise ConnectionError(self._lost_because) from None
            raise

    def _receiver(self) -> Callable[[list[Any]], None]:
        """What the subscription's connection hands each batch of replies to; raises to end the link."""
        owner = self._owner
        on_frame = owner.on_frame
        assert on_frame is not None
        head = owner.channel_head
        probe_channel = self.probe_channel
        positions = owner.positions
        dropped = owner.metrics.dropped.labels("duplicate")
        last_message = owner.metrics.broker_last_message

        def receive(batch: list[Any]) -> None:
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
                    elif not asked and (channel == probe_channel or channel[head:-3] in self.streams):
                        # Redis dropped a channel we still want (its slot moved): start again.
                        raise ConnectionError(f"redis unsubscribed {channel!r}")
            last_message.set(time.time())

        return receive

    def _watch_probe(self, pubsub: RawConnection) -> None:
        """Every probe interval: a link whose probe has not come back in time is dropped, and so
        is one on a node that is not the primary (a demoted one still relays the probe)."""
        self._probe_timer = None
        if self._pubsub is not pubsub:
            return
        timeout = self._owner.settings.probe_timeout_seconds
        if time.monotonic() - self.last_probe > timeout:
            self._owner.metrics.probe_failures.inc()
            self._lost_because = f"no probe back from Redis for {timeout:g}s"
            pubsub.abort()  # the read fails at once, and the subscription is rebuilt
            return
        if not self._owner.connector.serves(pubsub):
            self.primary_changed()
            return
        loop = asyncio.get_running_loop()
        self._probe_timer = loop.call_later(self._owner.settings.probe_interval_seconds, self._watch_probe, pubsub)

    def close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self.subscribed = False
        if self._probe_timer is not None:
            self._probe_timer.cancel()
            self._probe_timer = None
        for confirmed in self._confirmations.values():
            if not confirmed.done():
                # An error, not a cancellation: a `subscribe` waiting on it must tell the two apart.
                confirmed.set_exception(ConnectionError("the subscription connection closed"))
        self._confirmations.clear()
        self._unsubscribing.clear()
        if pubsub is not None:
            pubsub.abort()  # Redis drops a connection's subscriptions with it
