"""Exposure: the limits a replica facing clients directly puts on its connections.

The server's HTTP protocol (`guardedhttp.py`) applies them: the header timeout and the largest
request head.
"""

from __future__ import annotations

from collections.abc import Sized

from prometheus_client import Counter, Gauge

from .metrics import Metrics
from .settings import Settings

# A request head (request line and headers) larger than this is answered 431.
MAX_HEAD_BYTES = 64 * 1024


class Exposure:
    """The header timeout, shared by every connection of one server."""

    def __init__(self, settings: Settings) -> None:
        self.header_timeout = settings.header_timeout_seconds
        self.header_timeouts: Counter | None = None

    def bind(self, metrics: Metrics, connections: Sized) -> None:
        """Export the figures on the app's registry, once the app's lifespan has made it."""
        registry = metrics.registry
        self.header_timeouts = Counter(
            "notify_header_timeouts",
            "Connections closed for not sending a complete request head in time: "
            "partial (answered 408) or silent (closed without a word).",
            ["kind"],
            registry=registry,
        )
        open_connections = Gauge(
            "notify_open_connections", "Open TCP connections: HTTP, WebSocket and SSE.", registry=registry
        )
        open_connections.set_function(lambda: len(connections))

    def timed_out(self, partial: bool) -> None:
        if self.header_timeouts is not None:
            self.header_timeouts.labels("partial" if partial else "silent").inc()
