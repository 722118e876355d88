"""Runtime: everything one app instance owns, created and torn down by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..auth.tokens import TokenVerifier
from ..broker import Broker
from ..config.settings import Settings
from ..core.ratelimit import TokenBucket
from ..core.topics import Topics
from ..delivery.hub import Hub
from ..telemetry.metrics import Metrics
from ..webhooks import ReadMarkers, Webhooks
from ..webhooks.fallback import Fallbacks


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
    # With NOTIFY_WEBHOOKS only: None otherwise, and every path that would tell them costs nothing.
    webhooks: Webhooks | None = None
    reads: ReadMarkers | None = None
    fallbacks: Fallbacks | None = None

    async def mark_read(self, user_id: str, up_to: str) -> int:
        """Move a user's read marker (an `ack` frame, `POST /me/notifications/read`); the unread count."""
        marked = await self.broker.mark_read(user_id, up_to)
        if self.reads is not None and marked.moved_to is not None:
            self.reads.moved(user_id, marked.moved_to)
        return marked.unread
