"""Connector: the broker's Redis clients, made for the topology NOTIFY_REDIS_URL names.

One Redis: every connection goes to it. Sentinel: every new connection goes to the primary the
connector knows, and the connector keeps knowing it: it asks every sentinel at once and believes
the answer with the highest config epoch (a sentinel that has not heard of a failover yet names the
old primary with an older epoch), it hears `+switch-master` from a sentinel, it asks again every
second in case that message was missed, and at once when a connection fails or Redis answers
READONLY (redis-py's SentinelManagedConnection turns READONLY into a connection error). Connections
already open are not moved by the pool: the connector tells the broker (`on_change`), which drops
its publish connection and its subscription so both are made again on the new primary.

TLS (rediss...): every connection verifies the server's certificate against NOTIFY_REDIS_CA_FILE
(else the system's CAs) and its host name, and may present NOTIFY_REDIS_CERT_FILE; a handshake
that fails is logged once, plainly, instead of showing up only as a broker that is never ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    BlockingConnectionPool,
    Connection,
    ConnectionPool,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff

from ...config.redis_url import CLUSTER, SENTINEL, Topology
from ...config.settings import Settings
from ...core.tasks import cancel_and_wait
from .connections import (
    PrimaryConnection,
    PrimaryPool,
    PrimaryTlsConnection,
    TlsConnection,
    tls_options,
)
from .resp import RawConnection

logger = logging.getLogger("service.broker")

# A sentinel answers in well under a millisecond; one that does not within this is passed over.
_SENTINEL_TIMEOUT = 0.5
# How often the primary is asked for even when nothing suggests it moved (a missed +switch-master).
_POLL_SECONDS = 1.0
# Failed publishes each suspect the primary: they share one round of questions this far apart.
_MIN_ASK_INTERVAL = 0.1

Address = tuple[str, int]


class Connector:
    """Makes the broker's clients and, under Sentinel, knows and follows the primary."""

    def __init__(self, settings: Settings) -> None:
        topology = settings.redis_topology()
        assert topology is not None
        self.topology: Topology = topology
        tls = tls_options(settings) if topology.tls else {}
        self._node_options: dict[str, Any] = {
            "username": topology.username,
            "password": topology.password,
            "db": topology.db,
            **tls,
        }
        self._primary: Address | None = None
        self._changed = asyncio.Event()  # replaced at every change: `pause` waits for the next one
        self._wake = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._pools: list[PrimaryPool] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._asking: asyncio.Task[None] | None = None
        self._unnamed = False  # the last round found no primary
        self._sentinel: Sentinel | None = None
        if topology.kind == SENTINEL:
            password = settings.redis_sentinel_password
            self._sentinel = Sentinel(
                list(topology.nodes),
                sentinel_kwargs={
                    "password": password.get_secret_value() if password else None,
                    "socket_timeout": _SENTINEL_TIMEOUT,
                    "socket_connect_timeout": _SENTINEL_TIMEOUT,
                    "retry": Retry(NoBackoff(), 0),
                    "decode_responses": True,
                    **({"ssl": True, **tls} if tls else {}),
                },
            )

    @property
    def clustered(self) -> bool:
        return self.topology.kind == CLUSTER

    def client(self, **options: Any) -> Any:
        """A client of the data node (the primary, under Sentinel; the whole cluster, routing each
        command by its key's slot, under Cluster) with these connection options. With
        `max_connections`, a call that finds them all busy waits for one, up to `pool_timeout`
        seconds, rather than failing at once: a burst on one replica queues instead of turning
        every other request on it into a 503."""
        kwargs = {**self._node_options, **options}
        kwargs["timeout"] = kwargs.pop("pool_timeout", None)
        kwargs.setdefault("max_connections", 2**31)
        topology = self.topology
        pool: ConnectionPool
        if topology.kind == CLUSTER:
            kwargs.pop("db", None)
            kwargs.pop("timeout")
            if topology.tls:
                kwargs["ssl"] = True
            seeds = [ClusterNode(host, port) for host, port in topology.nodes]
            # Only primaries are read from: a replica may lag behind what a publish answered.
            return RedisCluster(startup_nodes=seeds, require_full_coverage=False, **kwargs)
        if self._sentinel is not None:
            kind = PrimaryTlsConnection if topology.tls else PrimaryConnection
            pool = PrimaryPool(topology.master_name, self._sentinel, self, connection_class=kind, **kwargs)
            self._pools.append(pool)
        elif topology.path is not None:
            pool = BlockingConnectionPool(connection_class=UnixDomainSocketConnection, path=topology.path, **kwargs)
        else:
            (host, port), kind = topology.nodes[0], TlsConnection if topology.tls else Connection
            pool = BlockingConnectionPool(connection_class=kind, host=host, port=port, **kwargs)
        return aioredis.Redis.from_pool(pool)

    def node_client(self, address: Address, **options: Any) -> aioredis.Redis:
        """A client of one node of a cluster (its own connections: publishes, subscriptions)."""
        kwargs = {**self._node_options, **options}
        kwargs.pop("db", None)
        kind = TlsConnection if self.topology.tls else Connection
        return aioredis.Redis.from_pool(
            ConnectionPool(connection_class=kind, host=address[0], port=address[1], **kwargs)
        )

    async def start(self) -> None:
        logger.info("redis: %s", self.topology.describe())
        if self._sentinel is not None:
            self._tasks = [
                asyncio.create_task(self._poll_forever(), name="redis-sentinel-poll"),
                asyncio.create_task(self._listen_forever(), name="redis-sentinel-listen"),
            ]

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks)
        if self._asking is not None:
            self._asking.cancel()
        if self._sentinel is not None:
            with contextlib.suppress(Exception):
                await self._sentinel.aclose()

    # ---- what the broker asks

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` whenever the primary moves (never for a single Redis)."""
        self._listeners.append(listener)

    def serves(self, conn: RawConnection | None) -> bool:
        """Whether `conn` is connected to the current primary: a subscription anywhere else would
        hear only what reaches that node, if anything, however well its probe goes."""
        if self._sentinel is None:
            return True
        return conn is not None and self._primary is not None and conn.address == self._primary

    def suspect(self) -> None:
        """Something failed in a way a failover would explain: ask the sentinels now."""
        self._wake.set()

    async def pause(self, seconds: float) -> None:
        """Sleep, or less: until the primary moves, since a retry then has somewhere to go."""
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await changed.wait()

    async def primary_address(self) -> Address:
        """The primary new connections go to; raises MasterNotFoundError while none is known."""
        if self._primary is None:
            await self._ask()
        if self._primary is None:
            raise MasterNotFoundError(f"no sentinel names a primary for {self.topology.master_name!r}")
        return self._primary

    # ---- following the primary

    async def _ask(self) -> None:
        """One round of questions, shared by everyone who wants an answer meanwhile."""
        task = self._asking
        if task is None or task.done():
            task = self._asking = asyncio.get_running_loop().create_task(self._ask_sentinels())
            task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def _ask_sentinels(self) -> None:
        assert self._sentinel is not None
        sentinels = self._sentinel.sentinels
        answers = await asyncio.gather(*(self._ask_one(s) for s in sentinels), return_exceptions=True)
        named = [answer for answer in answers if isinstance(answer, tuple)]
        if not named:
            problems = "; ".join(f"{_where(s)}: {a}" for s, a in zip(sentinels, answers, strict=True))
            # Once per outage: during a failover every round fails, each a little differently.
            level = logging.DEBUG if self._unnamed else logging.WARNING
            logger.log(level, "redis: no sentinel names a primary for %r: %s", self.topology.master_name, problems)
            self._unnamed = True
            return
        self._unnamed = False
        _, address = max(named)
        if address != self._primary:
            await self._moved(address)

    async def _ask_one(self, sentinel: aioredis.Redis) -> tuple[int, Address]:
        assert self._sentinel is not None
        name = self.topology.master_name
        async with asyncio.timeout(_SENTINEL_TIMEOUT):
            state = await sentinel.sentinel_master(name)
        if not self._sentinel.check_master_state(state, name):
            raise MasterNotFoundError(f"the primary is down ({state.get('flags')})")
        return int(state["config-epoch"]), (str(state["ip"]), int(state["port"]))

    async def _moved(self, address: Address) -> None:
        old, self._primary = self._primary, address
        if old is None:
            logger.info("redis: primary %r is %s:%d", self.topology.master_name, *address)
        else:
            logger.warning("redis: primary %r moved from %s:%d to %s:%d", self.topology.master_name, *old, *address)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        for listener in self._listeners:
            listener()
        for pool in self._pools:
            with contextlib.suppress(Exception):
                await pool.get_master_address()  # idle connections to the old primary are closed

    async def _poll_forever(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._ask()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next round asks again
                logger.debug("sentinel round failed: %s", exc)
            await asyncio.sleep(_MIN_ASK_INTERVAL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_SECONDS):
                    await self._wake.wait()

    async def _listen_forever(self) -> None:
        """Hear +switch-master from one sentinel at a time, moving on to the next when it fails."""
        assert self._sentinel is not None
        sentinels, name, turn = self._sentinel.sentinels, self.topology.master_name, 0
        while True:
            pubsub = sentinels[turn % len(sentinels)].pubsub()
            turn += 1
            try:
                await pubsub.subscribe("+switch-master")
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    # "<name> <old-ip> <old-port> <new-ip> <new-port>": the message has no epoch, the answers do.
                    if message is not None and str(message["data"]).split(" ", 1)[0] == name:
                        self.suspect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the poll covers the gap; try the next sentinel
                logger.debug("sentinel subscription failed: %s", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(0.5)


def refuse_non_cluster_seeds(settings: Settings) -> str | None:
    """Why start-up must stop: a cluster seed that answers as a Redis outside any cluster (a seed
    that does not answer yet is waited for, like any Redis that is down at start)."""
    topology = settings.redis_topology()
    if topology is None or topology.kind != CLUSTER:
        return None
    tls = {"ssl": True, **tls_options(settings)} if topology.tls else {}
    for host, port in topology.nodes:
        client = redis.Redis(
            host=host,
            port=port,
            username=topology.username,
            password=topology.password,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            **tls,
        )
        try:
            enabled = client.info("cluster").get("cluster_enabled")
        except redis.RedisError:
            continue
        finally:
            client.close()
        if not enabled:
            return (
                f"NOTIFY_REDIS_URL: {host}:{port} is not a cluster node (cluster_enabled:0);"
                " use redis://host:port/db for one Redis"
            )
    return None


def _retrieve(task: asyncio.Task[None]) -> None:
    """A round whose askers all gave up is not an unhandled error: the next round asks again."""
    if not task.cancelled():
        task.exception()


def _where(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"
