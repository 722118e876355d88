"""The Redis clients one broker is built on: the pool (with a hard deadline per command, waiting for a
place rather than opening a socket per stuck call), the pipelined connections publishes share (one,
or one per primary in a cluster), and the subscription's connections."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ...config.settings import Settings
from .cluster import ClusterPipelines, SlotMap
from .connector import Connector
from .pipeline import AutoPipeline


class RedisClients:
    """Made once per broker from the settings and the connector (which knows where Redis is)."""

    def __init__(self, settings: Settings, connector: Connector) -> None:
        self._connector = connector
        # Commands get a hard deadline; the pool blocks rather than opening a socket per stuck call.
        self.redis = connector.client(
            decode_responses=True,
            # The call's own deadline (`_call`) always fires before the socket times out: a reply that
            # is merely late is never retried, since the publish script may already have run.
            # The one retry is for a pooled connection found dead (Redis restarted), where it did not.
            socket_timeout=settings.publish_timeout_seconds + 1.0,
            socket_connect_timeout=settings.publish_timeout_seconds,
            retry=Retry(NoBackoff(), 1),
            max_connections=settings.redis_pool_size,
            pool_timeout=settings.publish_timeout_seconds,
        )
        # redis-py's cluster client has no waiting pool (each node's raises when its connections are
        # out): there, calls queue here for one of NOTIFY_REDIS_POOL_SIZE places instead.
        self.gate = asyncio.Semaphore(settings.redis_pool_size) if connector.clustered else None
        # Publishes, the hot path, share one pipelined connection (one per primary, in a cluster);
        # everything else uses the pool.
        self.slots: SlotMap | None = None
        self.pipeline: AutoPipeline | ClusterPipelines
        if connector.clustered:
            slots = self.slots = SlotMap(self.redis)
            node_options = {"decode_responses": True, "socket_connect_timeout": settings.publish_timeout_seconds}

            def pipeline_to(address: tuple[str, int]) -> AutoPipeline:
                client = connector.node_client(address, **node_options)
                return AutoPipeline(
                    client,
                    settings.publish_timeout_seconds,
                    replicas=settings.redis_replicas_ack,
                    on_broken=slots.suspect,
                )

            self.pipeline = ClusterPipelines(slots, pipeline_to)
        else:
            self.pipeline = AutoPipeline(
                self.redis,
                settings.publish_timeout_seconds,
                replicas=settings.redis_replicas_ack,
                on_broken=connector.suspect,
            )
        self._sub_options = {
            "decode_responses": True,
            "socket_connect_timeout": settings.publish_timeout_seconds,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
        }

    def subscription_client(self, address: tuple[str, int] | None) -> Any:
        """The subscription's connections, read raw (resp.RawConnection). They wait for messages
        indefinitely: the probe, not a socket timeout, finds stalls."""
        if address is None:
            return self._connector.client(**self._sub_options)
        return self._connector.node_client(address, **self._sub_options)
