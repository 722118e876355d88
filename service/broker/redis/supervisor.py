"""Supervisor: the Redis broker's background tasks, kept, and restarted when they fail.

A task that ends on an unexpected error (a bug, a reply of a shape nobody planned for) would
otherwise leave the replica quietly without its subscription, presence or heartbeat. Each one
runs here: restarted with capped, jittered backoff, counted in `notify_broker_task_restarts_total`
and logged once per episode (a run that lasted a while ends the episode). Short-lived jobs
(a link to a former primary being stopped) are kept too, so none is collected mid-flight and
their failures are seen.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from typing import Any

from prometheus_client import Counter

from ...core.tasks import cancel_and_wait

logger = logging.getLogger("service.broker")

Job = Callable[[], Coroutine[Any, Any, None]]

# A run this long (seconds) without failing ends an episode: the next failure is logged again.
HEALTHY_AFTER = 30.0
_FIRST_BACKOFF = 0.1


class Supervisor:
    """Owns the broker's background tasks from start to stop."""

    def __init__(self, restarts: Counter, max_backoff: float) -> None:
        self._restarts = restarts
        self._max_backoff = max_backoff
        self._kept: set[asyncio.Task[None]] = set()
        self._once: set[asyncio.Task[None]] = set()

    def keep(self, name: str, job: Job) -> asyncio.Task[None]:
        """Run `job()` until it returns; restart it whenever it raises."""
        return _track(self._kept, asyncio.get_running_loop().create_task(self._supervise(name, job), name=name))

    def once(self, name: str, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a job once, kept until it ends; a failure is logged, not lost."""
        return _track(self._once, asyncio.get_running_loop().create_task(self._report(name, job), name=name))

    async def stop(self) -> None:
        """Cancel the tasks that run forever; let the one-off jobs (closing links) finish."""
        await cancel_and_wait(list(self._kept))
        await asyncio.gather(*self._once, return_exceptions=True)

    async def _supervise(self, name: str, job: Job) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        restarts = self._restarts.labels(name)
        while True:
            started = loop.time()
            try:
                await job()
                return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - whatever it was, the task must go on
                if loop.time() - started >= HEALTHY_AFTER:
                    failures = 0
                failures += 1
                restarts.inc()
                if failures == 1:
                    logger.exception("%s failed; restarting it (logged once until it runs for a while)", name)
                else:
                    logger.debug("%s failed again (%d in a row)", name, failures, exc_info=True)
            cap = min(self._max_backoff, _FIRST_BACKOFF * 2 ** min(failures, 10))
            await asyncio.sleep(random.uniform(cap / 2, cap))

    async def _report(self, name: str, job: Coroutine[Any, Any, None]) -> None:
        try:
            await job
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - seen here, not lost with the task
            logger.exception("%s failed", name)


def _track(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> asyncio.Task[None]:
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task
