"""The outbox: a durable queue of jobs for outside destinations (webhook endpoints today), delivered
at least once. It knows nothing of what a job means: a destination key, an opaque payload, attempts
and a due time. `base.py` is the interface and the retry schedule, `memory.py` the in-process queue
of the embedded broker, `redis.py` the one every replica shares, `dispatch.py` the loop that hands
claimed jobs to a sender.

May import `service.broker`, `service.telemetry`, `service.core` and `service.config`."""

from __future__ import annotations

from ..broker import Broker
from .base import DestinationStats, Job, Outbox
from .dispatch import Delivered, Dispatcher, Failed, Outcome, Refused

__all__ = [
    "DestinationStats",
    "Delivered",
    "Dispatcher",
    "Failed",
    "Job",
    "Outbox",
    "Outcome",
    "Refused",
    "create_outbox",
]


def create_outbox(
    broker: Broker, delays: tuple[float, ...], max_pending: int, attempt_seconds: float, tag: str = "ob"
) -> Outbox:
    """The outbox beside the broker: in Redis when the broker is, else in this process. A job is
    leased to one replica for `attempt_seconds` (how long one delivery attempt may take) and a margin.
    `tag` names its keys in Redis (`ob`: webhooks, `op`: pushes), so two outboxes never share jobs."""
    from ..broker.redis.broker import RedisBroker

    if isinstance(broker, RedisBroker):
        from .redis import RedisOutbox

        return RedisOutbox(broker, delays, max_pending, attempt_seconds, tag)
    from .memory import MemoryOutbox

    return MemoryOutbox(delays, max_pending)
