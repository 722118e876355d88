"""Dispatcher: claims due jobs and hands each to a sender, at most `concurrency` at once and at most
`per_destination` of them to one destination, then settles it as the sender's outcome says."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..core.errors import BrokerUnavailable
from ..core.tasks import cancel_and_wait
from .base import Job, Outbox

logger = logging.getLogger("service.outbox")

# How often the queue is asked for due jobs when nothing woke the dispatcher: another replica's
# enqueues and retries coming due are found within this.
POLL_SECONDS = 0.25
# How long a stopping replica spends handing back the jobs it was attempting.
RELEASE_SECONDS = 2.0
# A job claimed for a destination already at its share is handed back, due again at the earliest
# this much later (more when the destination's attempts are slow: see `_Lane.postpone`).
POSTPONE_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class Delivered:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    """Retried per the delays, not sooner than `not_before` seconds (dead after the last)."""

    error: str
    not_before: float = 0.0


@dataclass(frozen=True, slots=True)
class Refused:
    """Dead at once (kept for replay): the destination refused it for good."""

    error: str


Outcome = Delivered | Failed | Refused
# What the dispatcher reports once a job is settled: the job, and "delivered", "retried" or "dead".
Report = Callable[[Job, str, Outcome], None]


class _Lane:
    """One destination's attempts in this replica."""

    __slots__ = ("mean", "next_free", "started")

    def __init__(self) -> None:
        self.started: dict[str, float] = {}  # job id -> when its attempt began
        self.mean = 0.0  # how long its attempts last, smoothed
        self.next_free = 0.0  # jobs handed back are due from here on, one after another

    def full(self, share: int) -> bool:
        # A job claimed when a place is free goes at once, even before jobs handed back earlier: a
        # destination's events keep their order only while it is below its share.
        return len(self.started) >= share

    def postpone(self, share: int, now: float) -> float:
        """Seconds until the job is due again. Jobs handed back are spaced by what one attempt in
        `share` takes (a hanging destination's by its attempts' age), so that each comes back about
        when a place is free: the queue's work for a destination that never answers stays that of
        its attempts, however many jobs wait for it."""
        oldest = min(self.started.values(), default=now)
        spacing = max(self.mean, now - oldest) / share
        self.next_free = max(self.next_free, now + POSTPONE_SECONDS) + spacing
        return self.next_free - now

    def finished(self, job_id: str, now: float) -> None:
        began = self.started.pop(job_id, now)
        self.mean = now - began if not self.mean else 0.8 * self.mean + 0.2 * (now - began)


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        send: Callable[[Job], Awaitable[Outcome]],
        report: Report,
        concurrency: int = 64,
        per_destination: int = 16,
        destinations: int | None = None,
    ) -> None:
        self._outbox = outbox
        self._send = send
        self._report = report
        self._concurrency = concurrency
        # A destination that never answers holds at most this many of the attempts in flight.
        self._share = min(per_destination, concurrency)
        self._lanes: dict[str, _Lane] = {}
        self._destinations = destinations  # how many there can be, when known
        self._busy = 0
        self._task: asyncio.Task[None] | None = None
        self._jobs: dict[asyncio.Task[None], Job] = {}  # attempts in flight

    def start(self) -> None:
        self._task = asyncio.create_task(self._claim_forever(), name="outbox-dispatcher")

    async def stop(self) -> None:
        """Stop claiming, abandon the attempts in flight and hand their jobs back, so that another
        replica takes them at once (those not handed back in time wait for their lease to run out)."""
        in_flight = list(self._jobs.values())
        await cancel_and_wait([self._task, *self._jobs])
        with contextlib.suppress(Exception):
            async with asyncio.timeout(RELEASE_SECONDS):
                await asyncio.gather(*(self._outbox.release(job) for job in in_flight), return_exceptions=True)

    async def _claim_forever(self) -> None:
        failures = 0
        while True:
            room = self._room()
            jobs = []
            if room > 0:
                try:
                    jobs = await self._outbox.claim(room)
                    failures = 0
                except Exception as exc:  # noqa: BLE001 - Redis down or slow: asked again, backing off
                    failures += 1
                    if failures == 1:
                        logger.warning("outbox: cannot claim jobs: %s", exc)
                    await asyncio.sleep(min(5.0, POLL_SECONDS * 2**failures))
                    continue
            started = await self._start(jobs)
            # Claimed again at once only while the queue gives all that was asked: a claim asks every
            # shard, so one per settled attempt would cost more than the attempts themselves.
            if not started or len(jobs) < room or self._busy >= self._concurrency:
                await self._outbox.wait(POLL_SECONDS)

    def _room(self) -> int:
        """How many jobs to claim: no more than the destinations have room for, so that a job is
        handed back only when the claim brought more for one destination than it has room for."""
        free = self._concurrency - self._busy
        if self._destinations is None:
            return free
        busy = [len(lane.started) for lane in self._lanes.values() if lane.started]
        idle = max(0, self._destinations - len(busy))
        return min(free, idle * self._share + sum(max(0, self._share - n) for n in busy))

    async def _start(self, jobs: list[Job]) -> int:
        """Attempt the claimed jobs whose destination has room here; hand back the others."""
        now, started, postponed = time.monotonic(), 0, []
        for job in jobs:
            lane = self._lanes.get(job.destination)
            if lane is None:
                lane = self._lanes[job.destination] = _Lane()
            if lane.full(self._share):
                postponed.append(self._outbox.release(job, lane.postpone(self._share, now)))
                continue
            lane.started[job.id] = now
            self._busy += 1
            started += 1
            task = asyncio.create_task(self._settle(job))
            self._jobs[task] = job
            task.add_done_callback(self._jobs.pop)
        if postponed:
            # One not handed back (Redis away) is taken again when its lease runs out.
            await asyncio.gather(*postponed, return_exceptions=True)
        return started

    async def _settle(self, job: Job) -> None:
        try:
            outcome = await self._send(job)
            try:
                if isinstance(outcome, Delivered):
                    await self._outbox.complete(job)
                    what = "delivered"
                elif isinstance(outcome, Failed):
                    retried = await self._outbox.fail(job, outcome.error, outcome.not_before)
                    what = "retried" if retried else "dead"
                else:
                    await self._outbox.bury(job, outcome.error)
                    what = "dead"
            except BrokerUnavailable as exc:
                # Not settled: its lease runs out and it is attempted again (at least once).
                logger.warning("outbox: job %s not settled: %s", job.id, exc)
                return
            self._report(job, what, outcome)
        except Exception:
            logger.exception("outbox: job %s failed unexpectedly", job.id)
        finally:
            self._busy -= 1
            now = time.monotonic()
            lane = self._lanes.get(job.destination)
            if lane is not None:
                lane.finished(job.id, now)
                if not lane.started and lane.next_free <= now:
                    del self._lanes[job.destination]
            self._outbox.wake()
