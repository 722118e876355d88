"""Runtime: everything one app instance owns, created and torn down by its lifespan."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..auth.tokens import TokenVerifier
from ..broker import Broker
from ..config.settings import Settings
from ..core.ratelimit import KeyedRate
from ..core.timers import TimerWheel
from ..core.topics import Topics
from ..delivery.hub import Hub
from ..delivery.memberlists import MemberLists
from ..push import Push
from ..push.jobs import PushJobs
from ..telemetry.metrics import Metrics
from ..webhooks import ReadMarkers, Webhooks
from ..webhooks.fallback import Fallbacks
from .hooks import Hooks


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
    member_lists: MemberLists
    # Per publisher (NOTIFY_PUBLISH_RATE) and per member (NOTIFY_MEMBER_PUBLISH_RATE); None: off.
    publish_rate: KeyedRate | None = None
    member_publish_rate: KeyedRate | None = None
    push: Push | None = None  # None: neither Web Push nor FCM configured
    hooks: Hooks | None = None  # None: no namespace names a join_hook or publish_hook
    draining: bool = False
    # Every connection's token expiry, on one loop timer (made in the lifespan, so on its loop).
    timers: TimerWheel = field(default_factory=lambda: TimerWheel(asyncio.get_running_loop()))
    # With NOTIFY_WEBHOOKS only: None otherwise, and every path that would tell them costs nothing.
    webhooks: Webhooks | None = None
    reads: ReadMarkers | None = None
    fallbacks: Fallbacks | None = None
    pushes: PushJobs | None = None  # with push configured only: sends through its outbox

    async def mark_read(self, user_id: str, up_to: str) -> int:
        """Move a user's read marker (an `ack` frame, `POST /me/notifications/read`); the unread count."""
        marked = await self.broker.mark_read(user_id, up_to)
        if marked.moved_to is not None:
            if self.reads is not None:
                self.reads.moved(user_id, marked.moved_to)
            if self.pushes is not None:
                self.pushes.read_moved(user_id, marked.moved_to)
        return marked.unread
