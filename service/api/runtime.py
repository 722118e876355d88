"""Runtime: everything one app instance owns, created and torn down by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from ..auth.tokens import TokenVerifier
from ..broker import Broker
from ..config.settings import Settings
from ..core.ratelimit import RateLimits
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
    # Per publisher, with NOTIFY_PUBLISH_RATE; None without it.
    publish_limits: RateLimits | None = None
