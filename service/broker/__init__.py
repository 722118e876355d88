"""Broker selection: Redis when NOTIFY_REDIS_URL is set, else the embedded in-process broker."""

from __future__ import annotations

import logging

from ..config.settings import Settings
from ..telemetry.metrics import Metrics
from .base import (
    Broker,
    HistoryPage,
    Inbox,
    MarkedRead,
    PublishCheck,
    Published,
    ReadState,
    RulesOf,
    StreamRules,
    TopicFull,
    frame_id,
)

__all__ = [
    "Broker",
    "HistoryPage",
    "Inbox",
    "MarkedRead",
    "Published",
    "PublishCheck",
    "ReadState",
    "StreamRules",
    "TopicFull",
    "create_broker",
    "frame_id",
]

logger = logging.getLogger("service.broker")


def create_broker(settings: Settings, replica_id: str, metrics: Metrics, rules: RulesOf) -> Broker:
    """The broker the settings ask for; `rules` tells it what sets each stream apart."""
    if settings.redis_url is None:
        from .memory import MemoryBroker

        logger.info("broker: embedded (single replica); set NOTIFY_REDIS_URL to scale out")
        return MemoryBroker(settings, replica_id, rules)
    # Settings refuse a malformed URL, and cluster mode until it has a broker, before anything starts.
    from .redis.broker import RedisBroker

    logger.info("broker: redis")
    return RedisBroker(settings, replica_id, metrics, rules)
