"""Stopping background tasks: a cancellation Python loses does not keep a task (or a stop) going."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from service.core.tasks import CANCEL_ROUNDS, cancel_and_wait

# How many loop turns into the worker's cycle the stop lands: together they cover every point of it.
OFFSETS = range(8)


async def _sends(sent: list[int], halt: list[bool]) -> None:
    """What redis-py does for each command when a socket timeout is set: the write, in `wait_for`."""
    while not halt and len(sent) < 1_000_000:
        await asyncio.wait_for(asyncio.sleep(0), timeout=10)
        sent.append(1)


async def _stop_at(offset: int, stop) -> tuple[bool, int]:
    """Start the worker, let `offset` loop turns pass, stop it; whether it ended, and what it sent after."""
    sent: list[int] = []
    halt: list[bool] = []
    task = asyncio.create_task(_sends(sent, halt))
    for _ in range(offset):
        await asyncio.sleep(0)
    await stop(task)
    at_stop = len(sent)
    await asyncio.sleep(0.05)
    ended = task.done()
    after = len(sent) - at_stop
    halt.append(True)  # a worker the stop left running ends here
    await asyncio.wait([task], timeout=1)
    return ended, after


async def _cancel_once(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.wait([task], timeout=0.2)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12 rewrote wait_for and keeps every cancellation")
async def test_one_cancellation_can_be_lost_in_wait_for():
    """Why the helper exists: on this Python, a task cancelled as its write finishes runs on."""
    outcomes = [await _stop_at(offset, _cancel_once) for offset in OFFSETS]
    assert any(not ended and after > 0 for ended, after in outcomes), outcomes


async def test_every_task_ends_whenever_its_stop_lands():
    outcomes = [await _stop_at(offset, lambda t: cancel_and_wait([t], patience=0.05)) for offset in OFFSETS]
    assert all(ended for ended, _ in outcomes), outcomes


async def test_a_task_that_keeps_refusing_is_logged_and_left(caplog):
    """A stop must end: a task that outlives every round is named in the log, not waited on for ever."""
    refusals = 0
    refusing = [True]

    async def refuses() -> None:
        nonlocal refusals
        while refusing:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                refusals += 1

    task = asyncio.create_task(refuses(), name="stubborn")
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="service.tasks"):
        await cancel_and_wait([task], patience=0.01)
    assert not task.done() and refusals >= CANCEL_ROUNDS
    assert f"stubborn is still running after {CANCEL_ROUNDS} rounds of cancellation" in caplog.text
    refusing.clear()
    task.cancel()
    await asyncio.wait([task], timeout=1)
    assert task.done()


async def test_a_failure_at_the_end_is_logged_and_the_stop_goes_on(caplog):
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("could not flush") from None

    failing = asyncio.create_task(fails_when_cancelled(), name="flusher")
    quiet = asyncio.create_task(asyncio.sleep(3600), name="sleeper")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="service.tasks"):
        await cancel_and_wait([failing, None, quiet])
    assert failing.done() and quiet.cancelled()
    assert "flusher failed as it stopped" in caplog.text and "could not flush" in caplog.text
