"""GcPacer: Python's full garbage collections kept out of reconnect storms.

A replica holds about seventy objects the collector tracks per open socket, and a full (oldest
generation) collection walks every one of them with the event loop stopped: 120 to 400 ms on a
replica of a few thousand sockets on a busy machine. CPython starts one whenever the long-lived
objects have grown by a quarter since the last, and that is exactly what a replica taking on a dead
replica's sockets does, so it paused several times in the second its own sockets' notifications
were most late (docs/reliability.md, "Reconnect storm").

So the objects made at start-up, which live as long as the process, are frozen out of every
collection, and while sockets arrive faster than `storm` a second, CPython's automatic full
collections are held back: once the arrivals slow down its own rule applies again, and the
collection that was due runs then (a storm that lasts gets one every `max_delay` seconds).
Outside a storm nothing changes: the young generations, and full collections, are CPython's.

This relies on the meaning of the third threshold (`gc.set_threshold`) in CPython's generational
collector, 3.11 to 3.13: collections of the middle generation between two full ones. CPython 3.14's
collector is incremental and ignores it, so outside `SUPPORTED` the pacer stays off and says so
once at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import platform
import sys
import time
from collections.abc import AsyncIterator, Sized

from ..core.tasks import cancel_and_wait

logger = logging.getLogger("service")

# The CPython versions whose collector the pacer is written for: [first, past the last).
SUPPORTED = ((3, 11), (3, 14))


def supported(implementation: str | None = None, version: tuple[int, int] | None = None) -> bool:
    """Whether this interpreter's collector gives the third threshold the meaning the pacer relies on."""
    implementation = implementation or platform.python_implementation()
    version = version or sys.version_info[:2]
    return implementation == "CPython" and SUPPORTED[0] <= version < SUPPORTED[1]


# Collections of the middle generation between two automatic full ones, while a storm lasts: never
# reached, so CPython starts no full collection until the threshold is put back.
_NEVER = 1 << 30


class GcPacer:
    """Holds CPython's full collections back while `connections` grows fast."""

    def __init__(self, connections: Sized, interval: float = 1.0, storm: int = 50, max_delay: float = 30.0) -> None:
        self._connections = connections
        self._interval = interval
        self._storm = storm
        self._max_delay = max_delay
        self._threshold: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self.holding_since: float | None = None  # monotonic time full collections were held back from
        self.held = 0  # storms during which they were

    def start(self) -> None:
        if not supported():
            logger.info(
                "full collections are not paced: the pacer knows CPython %d.%d to %d.%d's collector, not %s %s",
                *SUPPORTED[0],
                SUPPORTED[1][0],
                SUPPORTED[1][1] - 1,
                platform.python_implementation(),
                platform.python_version(),
            )
            return
        if gc.get_threshold()[2] == _NEVER or not gc.isenabled():
            return  # another app in this process paces them already, or collection is off altogether
        gc.collect()
        gc.freeze()
        self._threshold = gc.get_threshold()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="gc-pacer")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        if self._threshold is not None:
            gc.set_threshold(*self._threshold)
            gc.unfreeze()
            self._threshold = None

    async def _run(self) -> None:
        assert self._threshold is not None
        young, middle, oldest = self._threshold
        last_count = len(self._connections)
        while True:
            await asyncio.sleep(self._interval)
            count = len(self._connections)
            arrivals, last_count = count - last_count, count
            storm = arrivals / self._interval >= self._storm
            now = time.monotonic()
            if storm and self.holding_since is None:
                self.holding_since = now
                self.held += 1
                gc.set_threshold(young, middle, _NEVER)
            elif self.holding_since is not None and not storm:
                self.holding_since = None
                gc.set_threshold(young, middle, oldest)
            elif self.holding_since is not None and now - self.holding_since >= self._max_delay:
                # A storm that goes on: the garbage of its closed sockets is freed now and then.
                gc.collect()
                self.holding_since = now


@contextlib.asynccontextmanager
async def paced_collections(connections: Sized) -> AsyncIterator[GcPacer]:
    """A GcPacer running for as long as the block: the server's hook into the app's lifespan."""
    pacer = GcPacer(connections)
    pacer.start()
    try:
        yield pacer
    finally:
        await pacer.stop()
