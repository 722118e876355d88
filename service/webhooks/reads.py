"""ReadMarkers: `notification.read` at most once a second per user, carrying the latest marker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

INTERVAL_SECONDS = 1.0


class ReadMarkers:
    """A user's first move is told at once; moves within the next second are held, and only the
    latest of them is told when it ends (per replica)."""

    def __init__(self, tell: Callable[[str, str], None]) -> None:
        self._tell = tell
        self._held: dict[str, str | None] = {}  # users told less than a second ago -> latest held marker

    def moved(self, user: str, up_to: str) -> None:
        if user in self._held:
            self._held[user] = up_to
            return
        self._held[user] = None
        self._tell(user, up_to)
        asyncio.get_running_loop().call_later(INTERVAL_SECONDS, self._release, user)

    def _release(self, user: str) -> None:
        latest = self._held.pop(user, None)
        if latest is not None:
            self.moved(user, latest)
