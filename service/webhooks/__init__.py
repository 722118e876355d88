"""Signed webhooks: events told to the backend's endpoints (NOTIFY_WEBHOOKS) through the outbox,
at least once. `sender.py` signs (Standard Webhooks v1) and POSTs one attempt, `webhooks.py` turns
events into jobs and settles them, `reads.py` paces read-marker events, `presence.py` tells joins and leaves.

May import `service.outbox`, `service.broker`, `service.telemetry`, `service.core` and `service.config`."""

from __future__ import annotations

from .presence import PresenceEvents
from .reads import ReadMarkers
from .webhooks import Webhooks

__all__ = ["PresenceEvents", "ReadMarkers", "Webhooks"]
