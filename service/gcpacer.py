"""GcPacer: Python's full garbage collections kept out of reconnect storms.

A replica holds about seventy objects the collector tracks per open socket, and a full (oldest
generation) collection walks every one of them with the event loop stopped: 120 to 400 ms on a
replica of a few thousand sockets on a busy machine. CPython starts one whenever the long-lived
objects have grown by a quarter since the last, and that is exactly what a replica taking on a dead
replica's sockets does, so it paused several times in the second its own sockets' notifications
were most late (docs/reliability.md, "Reconnect storm").

So the objects made at start-up, which live as long as the process, are frozen out of every
collection; automatic full collections are off, and this task runs one on the same rule (the heap
grew by a quarter since the last), checked every second, but not while sockets are arriving faster
than `storm` a second, for at most `max_delay` seconds. The young generations are still collected
by CPython as usual: they are small and most garbage dies there.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
from collections.abc import Sized

logger = logging.getLogger("service")

# Collections of the middle generation between two automatic full ones: never reached, so CPython
# itself never starts a full collection while the pacer runs.
_NEVER = 1 << 30


class GcPacer:
    """Runs full collections on CPython's rule, held back while `connections` grows fast."""

    def __init__(
        self,
        connections: Sized,
        interval: float = 1.0,
        growth: float = 0.25,
        storm: int = 50,
        max_delay: float = 30.0,
    ) -> None:
        self._connections = connections
        self._interval = interval
        self._growth = growth
        self._storm = storm
        self._max_delay = max_delay
        self._threshold: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._baseline = 0
        self.collections = 0
        self.deferred = 0  # checks at which a due collection was held back

    def start(self) -> None:
        if gc.get_threshold()[2] == _NEVER or not gc.isenabled():
            return  # another app in this process paces them already, or collection is off altogether
        gc.collect()
        gc.freeze()
        self._threshold = gc.get_threshold()
        gc.set_threshold(self._threshold[0], self._threshold[1], _NEVER)
        self._baseline = sys.getallocatedblocks()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gc-pacer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._threshold is not None:
            gc.set_threshold(*self._threshold)
            gc.unfreeze()
            self._threshold = None

    async def _run(self) -> None:
        last_count = len(self._connections)
        due_since: float | None = None
        while True:
            await asyncio.sleep(self._interval)
            count = len(self._connections)
            arrivals, last_count = count - last_count, count
            now = time.monotonic()
            if not self.due():
                due_since = None
                continue
            due_since = now if due_since is None else due_since
            if arrivals * (1 / self._interval) >= self._storm and now - due_since < self._max_delay:
                self.deferred += 1
                continue
            self.collect()
            due_since = None

    def due(self) -> bool:
        return sys.getallocatedblocks() >= self._baseline * (1 + self._growth)

    def collect(self) -> None:
        started = time.perf_counter()
        found = gc.collect()
        self._baseline = sys.getallocatedblocks()
        self.collections += 1
        logger.debug("full collection: %d unreachable, %.0f ms", found, (time.perf_counter() - started) * 1e3)
