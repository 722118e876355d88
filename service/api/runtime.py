"""Runtime: everything one app instance owns, created and torn down by its lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..auth.tokens import TokenVerifier
from ..broker import Broker
from ..config.settings import Settings
from ..core.topics import Topics
from ..delivery.hub import Hub
from ..telemetry.metrics import Metrics


@dataclass(slots=True)
class TokenBucket:
    """`rate` events per second on average, bursts up to `rate`."""

    rate: float
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.rate

    def take(self) -> float:
        """0 if an event may pass now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


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
