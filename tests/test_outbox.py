"""The outbox contract, on both implementations (in-process, and Redis shared by two replicas)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from service.broker import Broker, StreamRules, create_broker
from service.config.settings import Settings
from service.outbox import Outbox, create_outbox
from service.outbox.base import JITTER, retry_delay
from service.telemetry.metrics import Metrics

from .utils import SECRET

DELAYS = (0.2, 0.2)


def _rules(stream: str) -> StreamRules:
    return StreamRules()


async def _broker(url: str | None, prefix: str, name: str) -> Broker:
    settings = Settings(jwt_secret=SECRET, redis_url=url, redis_prefix=prefix)  # type: ignore[arg-type]
    broker = create_broker(settings, name, Metrics(name), _rules)

    async def on_lost() -> None:
        return None

    await broker.start(lambda target, frame: None, on_lost)
    return broker


@pytest.fixture(params=["memory", "redis"])
async def outboxes(request, redis_server) -> AsyncIterator[list[Outbox]]:
    """Two replicas' outboxes on one Redis (or one in-process outbox, twice)."""
    url = redis_server.url if request.param == "redis" else None
    prefix = f"o{uuid.uuid4().hex[:8]}"
    brokers = [await _broker(url, prefix, "r1")]
    if url is not None:
        brokers.append(await _broker(url, prefix, "r2"))
    # attempt_seconds 0: a lease runs out after the margin alone.
    made = [create_outbox(b, DELAYS, max_pending=20, attempt_seconds=0.0) for b in brokers]
    yield made if url is not None else made * 2
    for broker in brokers:
        await broker.stop()


async def _claim_all(outbox: Outbox, count: int, timeout: float = 5.0) -> list:
    jobs: list = []
    deadline = time.monotonic() + timeout
    while len(jobs) < count and time.monotonic() < deadline:
        jobs += await outbox.claim(64)
        if len(jobs) < count:
            await asyncio.sleep(0.05)
    return jobs


async def test_each_job_handed_to_one_replica_in_order(outboxes):
    """Ten jobs enqueued on one replica: claimed once in all, across both, and one order key's in order."""
    a, b = outboxes
    ids = [await a.enqueue("d:1", f"p{i}", "stream-x") for i in range(10)]
    first, second = await asyncio.gather(a.claim(64), b.claim(64))
    claimed = first + second
    assert sorted(job.id for job in claimed) == sorted(ids)
    for hand_out in (first, second):
        assert [job.id for job in hand_out] == [i for i in ids if i in {job.id for job in hand_out}]
    assert await a.claim(64) == [] and await b.claim(64) == []
    for job in claimed:
        await a.complete(job)
    stats = (await b.stats())["d:1"]
    assert stats.pending == 0 and stats.delivered == 10 and stats.last_success_ms


async def test_failures_retry_then_die_and_replay(outboxes):
    """A failed job comes back after a delay with its id, dies after the last delay, and is replayed."""
    a, b = outboxes
    job_id = await a.enqueue("d:2", "payload", "k")
    for attempt in range(len(DELAYS)):
        (job,) = await _claim_all(b, 1)
        assert job.id == job_id and job.attempts == attempt
        assert await b.fail(job, f"HTTP 500 #{attempt}") is True
    (job,) = await _claim_all(a, 1)
    assert await a.fail(job, "HTTP 500 last") is False
    (dead,) = await b.dead(10)
    assert dead.id == job_id and dead.error == "HTTP 500 last" and dead.attempts == 3 and dead.payload == "payload"
    stats = (await a.stats())["d:2"]
    assert stats.pending == 0 and stats.dead == 1 and stats.failed == 3 and stats.last_error == "HTTP 500 last"
    assert await a.replay(["msg_nonsense"]) == 0
    assert await a.replay([job_id]) == 1
    (again,) = await _claim_all(b, 1)
    assert again.id == job_id and again.attempts == 0
    await b.complete(again)
    assert await a.dead(10) == [] and (await a.stats())["d:2"].dead == 0


async def test_pending_bound_refuses_new_jobs(outboxes):
    """Beyond the pending bound a destination's new jobs are refused (the caller counts them)."""
    a, _ = outboxes
    queued = [await a.enqueue("d:3", "x", f"k{i}") for i in range(200)]
    refused = queued.count(None)
    assert refused > 0 and (await a.stats())["d:3"].pending == 200 - refused
    assert 20 <= 200 - refused <= 40  # over by at most what was enqueued within a second, never under


async def test_retry_after_and_jitter():
    """A delay moves by at most the jitter, never below a Retry-After, and there is none after the last."""
    for _ in range(200):
        delay = retry_delay((10.0,), 1)
        assert delay is not None and 10 * (1 - JITTER) <= delay <= 10 * (1 + JITTER)
    assert retry_delay((1.0,), 1, not_before=30.0) == 30.0
    assert retry_delay((1.0,), 2) is None


async def test_lease_of_a_dead_replica_runs_out(redis_server):
    """A job claimed by a replica that never settles it is handed to another once its lease ran out."""
    prefix = f"o{uuid.uuid4().hex[:8]}"
    brokers = [await _broker(redis_server.url, prefix, name) for name in ("r1", "r2")]
    try:
        from service.outbox.redis import LEASE_MARGIN_SECONDS, RedisOutbox

        a, b = (RedisOutbox(br, DELAYS, 0, attempt_seconds=-LEASE_MARGIN_SECONDS + 0.5) for br in brokers)  # type: ignore[arg-type]
        job_id = await a.enqueue("d:4", "x", "k")
        (held,) = await _claim_all(a, 1)
        assert held.id == job_id and await b.claim(64) == []
        (taken,) = await _claim_all(b, 1)
        assert taken.id == job_id
        # The first holder's late failure does not touch what is now the other's.
        await a.fail(held, "late")
        await b.complete(taken)
        assert (await a.stats())["d:4"].pending == 0
    finally:
        for broker in brokers:
            await broker.stop()


async def test_a_released_job_is_due_again_at_once(outboxes):
    """A job handed back by a stopping replica goes to the next claim, its attempts unchanged."""
    a, b = outboxes
    job_id = await a.enqueue("d:5", "x", "k")
    (held,) = await _claim_all(a, 1)
    await a.release(held)
    (again,) = await b.claim(64)
    assert again.id == job_id and again.attempts == 0
    await b.complete(again)
