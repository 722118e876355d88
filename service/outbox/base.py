"""What every outbox offers, and the retry schedule they share."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Each delay before a retry is moved by up to this much either way, so that the jobs one outage
# failed together do not all come back in the same instant.
JITTER = 0.2
# Dead jobs kept for inspection and replay (per shard in Redis); the oldest go beyond it.
DEAD_KEPT = 10_000
# A job's id: `msg_`, then hex: milliseconds (12), a per-process counter (6), the shard (2), random (8).
# Ids sort in the order they were made within one process, and name the shard the job lives in.
_SHARD_AT = slice(22, 24)
_counter = itertools.count()


class Waker:
    """`wake` and `wait` for an outbox: a local enqueue is claimed at once, others' at the next poll."""

    def __init__(self) -> None:
        self._woken = asyncio.Event()

    def wake(self) -> None:
        self._woken.set()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._woken.wait()
        self._woken.clear()


def new_id(shard: int) -> str:
    ms = time.time_ns() // 1_000_000
    return f"msg_{ms:012x}{next(_counter) % 0x1000000:06x}{shard:02x}{secrets.token_hex(4)}"


def shard_of(job_id: str) -> int | None:
    """The shard a job id names; None for something that is not a job id."""
    if len(job_id) != 32 or not job_id.startswith("msg_"):
        return None
    try:
        int(job_id[4:], 16)
    except ValueError:
        return None
    return int(job_id[_SHARD_AT], 16)


def retry_delay(delays: Sequence[float], failures: int, not_before: float = 0.0) -> float | None:
    """Seconds until the next attempt after the `failures`-th failure, jittered, and never sooner
    than `not_before` (a Retry-After); None when the delays are used up: the job is dead."""
    if failures > len(delays):
        return None
    delay = delays[failures - 1] * random.uniform(1 - JITTER, 1 + JITTER)
    return max(delay, not_before)


@dataclass(slots=True)
class Job:
    """One thing to deliver to one destination, as handed out by `claim`."""

    id: str
    destination: str
    payload: str
    created_ms: int
    attempts: int = 0  # failed attempts so far
    error: str = ""  # the last failure
    claim: str = ""  # which hand-out this is: a job whose lease ran out is handed to someone else
    died_ms: int = 0


@dataclass(slots=True)
class DestinationStats:
    pending: int = 0
    delivered: int = 0
    failed: int = 0  # failed attempts
    dead: int = 0
    last_success_ms: int | None = None
    last_error: str | None = None
    last_error_ms: int | None = None
    paused: str | None = None  # why it is paused, when it is


class Outbox(Protocol):
    """Jobs enqueued by any replica, each handed to one replica at a time, until delivered or dead."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def enqueue(self, destination: str, payload: str, order_key: str) -> str | None:
        """Queue a job (due now); its id, or None when the destination is over its pending bound.
        Jobs of one `order_key` are handed out in the order they were enqueued."""
        ...

    async def claim(self, limit: int) -> list[Job]:
        """Up to `limit` due jobs, each leased to the caller until it settles them."""
        ...

    async def complete(self, job: Job) -> None:
        """Delivered: forgotten."""
        ...

    async def fail(self, job: Job, error: str, not_before: float = 0.0) -> bool:
        """Failed: retried per the delays (True), or dead after the last (False)."""
        ...

    async def bury(self, job: Job, error: str) -> None:
        """Dead at once, kept for replay."""
        ...

    async def release(self, job: Job, delay: float = 0.0) -> None:
        """Handed back without an attempt counted (this replica stops, or the destination is at
        its share of attempts here): due again after `delay` seconds."""
        ...

    async def dead(self, limit: int) -> list[Job]:
        """Dead jobs, newest first."""
        ...

    async def replay(self, ids: Sequence[str] | None) -> int:
        """Dead jobs (all, or those named) queued again with fresh attempts; how many were."""
        ...

    async def stats(self) -> dict[str, DestinationStats]: ...

    async def pause(self, destination: str, reason: str) -> None: ...

    async def resume(self, destination: str) -> None: ...

    def wake(self) -> None:
        """Something may be due now (an enqueue here): claim without waiting for the next poll."""
        ...

    async def wait(self, seconds: float) -> None:
        """Until `wake` is called or `seconds` pass."""
        ...
