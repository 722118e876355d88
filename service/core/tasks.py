"""Stopping background tasks: cancel them, and make sure they end.

On Python 3.11, `asyncio.wait_for` returns normally when the task waiting in it is cancelled in
the same loop turn as the awaited work finishes (python/cpython#86296, fixed in 3.12): the
cancellation is lost and the task runs on. redis-py sends every command through `wait_for` when
a socket timeout is set, so a broker task cancelled while a command goes out can go on for good
(a subscription rebuilt every few seconds after its broker stopped, and the stop waiting on it).
So a task still running a moment after its cancel is cancelled again. `asyncio.wait` is how the
stopper waits: it neither raises the task's CancelledError nor swallows the stopper's own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger("service.tasks")

# How long a cancelled task gets to end (its own clean-up included) before it is cancelled again,
# and how many times. A task that outlives all of them is logged and left: a stop must end.
RECANCEL_AFTER_SECONDS = 1.0
CANCEL_ROUNDS = 10
_TURNS = 4


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any] | None], patience: float = RECANCEL_AFTER_SECONDS
) -> None:
    """Cancel every task (None is skipped) and wait until each has ended."""
    pending = {task for task in tasks if task is not None and not task.done()}
    ended: set[asyncio.Future[Any]] = set()
    for round_ in range(CANCEL_ROUNDS):
        if not pending:
            break
        for task in pending:
            task.cancel()
        if round_:
            # A cancellation was lost. It is lost only when it lands in one part of the task's cycle
            # (between its write finishing and `wait_for` resuming), so the next few loop turns get
            # one each: one of them lands outside that part. The first round sends one, so that a
            # task's own clean-up on cancellation is not cut short.
            for _ in range(_TURNS):
                await asyncio.sleep(0)
                for task in pending:
                    if not task.done():
                        task.cancel()
        done, pending = await asyncio.wait(pending, timeout=patience)
        ended |= done
    for task in ended:
        # A failure at the end is seen, not left for "exception was never retrieved".
        if not task.cancelled() and task.exception() is not None:
            logger.warning("%s failed as it stopped", _name(task), exc_info=task.exception())
    for task in pending:
        logger.error("%s is still running after %d rounds of cancellation; left running", _name(task), CANCEL_ROUNDS)


def _name(task: asyncio.Future[Any]) -> str:
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
