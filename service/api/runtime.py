"""Runtime: everything one app instance owns, created and torn down by its lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..auth.tokens import TokenVerifier
from ..broker import Broker
from ..config.settings import Settings
from ..core.ratelimit import TokenBucket
from ..core.timers import TimerWheel
from ..core.topics import Topics
from ..delivery.hub import Hub
from ..telemetry.metrics import Metrics


@dataclass(slots=True)
class Runtime:
    """The app's objects; reached from routes through `request.state.runtime`."""

    settings: Settings
    replica_id: str
    metrics: Metrics
    broker: Broker
    hub: Hub
    verifier: TokenVerifier
    topics: Topics
    draining: bool = False
    publish_buckets: dict[str, TokenBucket] = field(default_factory=dict)
    # Every connection's token expiry, on one loop timer (made in the lifespan, so on its loop).
    timers: TimerWheel = field(default_factory=lambda: TimerWheel(asyncio.get_running_loop()))
