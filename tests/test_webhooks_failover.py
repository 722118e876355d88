"""Webhooks across a Redis Sentinel failover: the queue lives on the primary, which is SIGKILLed
while events wait in it and while backends keep publishing; every event is still delivered at
least once, from the promoted replica, or counted as dropped (never lost silently)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
import pytest

from .receiver import receiving
from .test_faults import is_ready, report, wait_for
from .test_webhooks import env
from .topology import SentinelTopology
from .utils import Replica, publisher_headers, started


async def undelivered(http: httpx.AsyncClient, replica: Replica, user: str, n: int) -> tuple[int, str]:
    """A notification to a user nobody is connected as, asking to hear that: `notification.undelivered`."""
    body = {"event": "msg", "data": {"n": n}, "fallback": {"when": "offline"}}
    answer = await http.post(f"{replica.url}/notify/{user}", json=body, headers=publisher_headers(), timeout=10)
    return answer.status_code, answer.json().get("id", "") if answer.status_code == 202 else ""


async def dropped(http: httpx.AsyncClient, replica: Replica) -> float:
    text = (await http.get(replica.url + "/metrics")).text
    return sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith("notify_webhook_events_dropped")
    )


@pytest.mark.slow
async def test_events_survive_a_sigkilled_primary(http):
    """Two replicas publish with `fallback: offline` before, during and after the primary is
    SIGKILLed, to a receiver slow enough that events wait in the queue when it dies: each accepted
    publish's `notification.undelivered` reaches the receiver (at least once) unless it was counted
    as dropped, and events queued after the promotion are delivered too."""

    def slow(_id: str, _nth: int) -> tuple[int, dict[str, str], float]:
        return (200, {}, 0.2)

    with receiving(slow) as receiver, SentinelTopology(replicas=2) as topo:
        config = topo.env(
            **env(receiver, events=("notification.undelivered",)),
            NOTIFY_REDIS_REPLICAS_ACK="1",
            NOTIFY_WEBHOOK_ENDPOINT_CONCURRENCY="4",
        )
        with started(Replica(config), Replica(config)) as (a, b):
            accepted: dict[str, float] = {}  # notification id -> when its publish was answered
            refused = 0
            stop = asyncio.Event()

            async def publisher(replica: Replica, offset: int) -> None:
                nonlocal refused
                for i in range(offset, 20_000, 2):
                    if stop.is_set():
                        return
                    status, notification = await undelivered(http, replica, f"away{i % 10}", i)
                    if status == 202:
                        accepted[notification] = time.monotonic()
                    else:
                        assert status == 503, status
                        refused += 1
                        await asyncio.sleep(0.05)  # as a backend backing off would

            tasks = [asyncio.create_task(publisher(a, 0)), asyncio.create_task(publisher(b, 1))]
            await wait_for(lambda: asyncio.sleep(0, len(accepted) >= 60), 30)
            old = topo.primary
            waiting = len(accepted) - len(receiver.events())
            old.kill()
            killed_at = time.monotonic()
            await asyncio.to_thread(topo.wait_promotion, old, 20)
            promoted_at = time.monotonic()
            await asyncio.gather(*(wait_for(lambda r=r: is_ready(http, r), 15) for r in (a, b)))
            await wait_for(lambda: asyncio.sleep(0, any(t > promoted_at for t in accepted.values())), 15)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*tasks)

            def told_ids() -> set[str]:
                return {r.event["data"]["id"] for r in receiver.events()}

            # Every accepted publish told; one whose event was counted as dropped never will be.
            with contextlib.suppress(AssertionError):
                await wait_for(lambda: asyncio.sleep(0, set(accepted) <= told_ids()), 60)
            told = told_ids()
            drops = await dropped(http, a) + await dropped(http, b)
            lost = set(accepted) - told
            after = [n for n, t in accepted.items() if t > promoted_at]
            report(
                "webhooks_sentinel_sigkill",
                accepted=len(accepted),
                refused_503=refused,
                waiting_in_queue_at_kill=waiting,
                accepted_after_promotion=len(after),
                promotion_s=promoted_at - killed_at,
                requests=len(receiver.events()),
                distinct_events=len(told),
                dropped=drops,
                not_delivered=len(lost),
            )
            assert receiver.unverified == 0
            assert waiting > 0, "events were waiting in the queue when the primary died"
            assert after and set(after) <= told, "events queued after the promotion are delivered"
            assert len(lost) <= drops, f"{len(lost)} events neither delivered nor counted as dropped"
