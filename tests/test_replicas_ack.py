"""NOTIFY_REDIS_REPLICAS_ACK: a publish is answered 202 only once that many Redis replicas confirm it.

`pytest -s` prints the figures (`FIGURES ...`), recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .test_faults import is_ready, report
from .topology import Node
from .utils import RedisServer, Replica, cluster_env, publish, started


async def wait_for_202(http: httpx.AsyncClient, replica: Replica, user: str, within: float) -> httpx.Response:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        response = await publish(http, replica, user, "after")
        if response.status_code == 202:
            return response
        assert response.status_code == 503, response.text
        await asyncio.sleep(0.05)
    raise AssertionError(f"no 202 within {within}s")


@pytest.mark.slow
async def test_replicas_ack_without_a_replica_is_503(http):
    """NOTIFY_REDIS_REPLICAS_ACK=1 on a Redis with no replica: every publish answers 503 within the
    publish deadline and none 202; once a replica attaches, publishes are accepted."""
    primary = RedisServer()
    primary.start()
    replica_node = Node(["--replicaof", "127.0.0.1", str(primary.port)])
    try:
        deadline = 1.0
        env = cluster_env(primary, NOTIFY_REDIS_REPLICAS_ACK="1", NOTIFY_PUBLISH_TIMEOUT_SECONDS=str(deadline))
        with started(Replica(env)) as (a,):

            async def timed(i: int) -> tuple[int, float]:
                started_at = time.monotonic()
                response = await publish(http, a, None if i % 5 == 0 else f"ack{i % 3}", "unconfirmed", i)
                return response.status_code, time.monotonic() - started_at

            results = [await timed(i) for i in range(3)]  # one at a time,
            results += await asyncio.gather(*(timed(i) for i in range(3, 33)))  # and 30 at once
            statuses = [status for status, _ in results]
            latencies = [latency for _, latency in results]
            assert statuses == [503] * len(results), statuses
            assert max(latencies) < deadline + 0.25, latencies
            assert await is_ready(http, a), "a missing replica is no reason to take sockets away"

            replica_node.start()
            await wait_for_202(http, a, "ack1", within=10)
            report(
                "replicas_ack_without_replica",
                publishes=len(results),
                answered_202=0,
                publish_deadline_s=deadline,
                latency_503_max_s=max(latencies),
                latency_503_min_s=min(latencies),
            )
    finally:
        replica_node.stop()
        primary.stop()
