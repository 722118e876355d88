"""MemoryOutbox: the embedded broker's queue, in this process (lost when it stops, as its history is)."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence

from .base import DEAD_KEPT, DestinationStats, Job, Waker, new_id, retry_delay


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class MemoryOutbox(Waker):
    """The Redis outbox's semantics within one process: one replica, so a job is only ever leased
    to itself, and a lease never runs out."""

    def __init__(self, delays: tuple[float, ...], max_pending: int) -> None:
        super().__init__()
        self._delays = delays
        self._max_pending = max_pending
        self._jobs: dict[str, Job] = {}  # pending (due or leased), by id
        self._due: list[tuple[float, int, str]] = []  # (due, order, id): a heap
        self._order = itertools.count()
        self._dead: dict[str, Job] = {}  # oldest first
        self._stats: dict[str, DestinationStats] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def _of(self, destination: str) -> DestinationStats:
        stats = self._stats.get(destination)
        if stats is None:
            stats = self._stats[destination] = DestinationStats()
        return stats

    async def enqueue(self, destination: str, payload: str, order_key: str) -> str | None:
        stats = self._of(destination)
        if self._max_pending and stats.pending >= self._max_pending:
            return None
        job = Job(new_id(0), destination, payload, _now_ms())
        self._jobs[job.id] = job
        heapq.heappush(self._due, (time.time(), next(self._order), job.id))
        stats.pending += 1
        self.wake()
        return job.id

    async def claim(self, limit: int) -> list[Job]:
        now, claimed = time.time(), []
        while self._due and self._due[0][0] <= now and len(claimed) < limit:
            _, _, job_id = heapq.heappop(self._due)
            job = self._jobs.get(job_id)
            if job is not None:
                job.claim = "local"
                claimed.append(job)
        return claimed

    async def complete(self, job: Job) -> None:
        if self._jobs.pop(job.id, None) is not None:
            stats = self._of(job.destination)
            stats.pending -= 1
            stats.delivered += 1
            stats.last_success_ms = _now_ms()

    async def fail(self, job: Job, error: str, not_before: float = 0.0) -> bool:
        delay = retry_delay(self._delays, job.attempts + 1, not_before)
        if delay is None:
            await self.bury(job, error)
            return False
        if job.id not in self._jobs:
            return True
        job.attempts += 1
        self._failed(job, error)
        heapq.heappush(self._due, (time.time() + delay, next(self._order), job.id))
        return True

    def _failed(self, job: Job, error: str) -> None:
        job.error = error
        stats = self._of(job.destination)
        stats.failed += 1
        stats.last_error, stats.last_error_ms = error, _now_ms()

    async def bury(self, job: Job, error: str) -> None:
        if self._jobs.pop(job.id, None) is None:
            return
        job.attempts += 1
        self._failed(job, error)
        job.died_ms = _now_ms()
        self._dead[job.id] = job
        stats = self._of(job.destination)
        stats.pending -= 1
        stats.dead += 1
        while len(self._dead) > DEAD_KEPT:
            oldest = self._dead.pop(next(iter(self._dead)))
            self._of(oldest.destination).dead -= 1

    async def release(self, job: Job, delay: float = 0.0) -> None:
        if job.id in self._jobs:
            heapq.heappush(self._due, (time.time() + delay, next(self._order), job.id))

    async def dead(self, limit: int) -> list[Job]:
        return list(itertools.islice(reversed(self._dead.values()), limit))

    async def replay(self, ids: Sequence[str] | None) -> int:
        chosen = list(self._dead) if ids is None else [i for i in ids if i in self._dead]
        for job_id in chosen:
            job = self._dead.pop(job_id)
            job.attempts, job.died_ms = 0, 0
            self._jobs[job_id] = job
            heapq.heappush(self._due, (time.time(), next(self._order), job_id))
            stats = self._of(job.destination)
            stats.dead -= 1
            stats.pending += 1
        if chosen:
            self.wake()
        return len(chosen)

    async def stats(self) -> dict[str, DestinationStats]:
        return {name: DestinationStats(**{f: getattr(s, f) for f in s.__slots__}) for name, s in self._stats.items()}

    async def pause(self, destination: str, reason: str) -> None:
        self._of(destination).paused = reason

    async def resume(self, destination: str) -> None:
        self._of(destination).paused = None
