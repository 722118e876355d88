"""The load benchmark's harness (tests/load), run tiny against one real replica so it cannot rot.

Not a timed test: it checks that the harness measures what it claims (every delivery counted,
nothing lost or doubled, latency and server CPU read), not how fast the service is."""

from __future__ import annotations

import asyncio

import pytest

from tests.load import workloads as W
from tests.load.bench import LEAN_PYTHON, NOTIFY
from tests.load.clients import Fleet, Publisher
from tests.load.procs import Deployment, System


async def _run(system: System) -> tuple[dict, dict, dict]:
    # The service on its embedded broker; the lean reference needs the Redis the deployment starts.
    with Deployment(system, 1, embedded=system is NOTIFY) as dep:
        port = dep.replicas[0].port
        fleet = Fleet("notify", users=5)
        connect = await W.connect(dep, fleet, lambda i: port, concurrency=10, timeout=10, settle=0.2)
        pub = Publisher(port, W.publisher_token())
        await pub.open(2)
        try:
            targeted = await W.targeted(dep, fleet, pub, rate=100, duration=1.0, drain=5.0)
            broadcast = await W.broadcast(dep, fleet, pub, rate=5, duration=1.0, drain=5.0)
        finally:
            pub.close()
            await fleet.close_all()
    return connect, targeted, broadcast


@pytest.mark.parametrize("system", [NOTIFY, LEAN_PYTHON], ids=lambda s: s.name)
def test_bench_harness_counts_every_delivery(system: System):
    connect, targeted, broadcast = asyncio.run(_run(system))
    assert connect["sockets"] == 10 and connect["connect_failures"] == 0
    assert connect["connects_per_s"] > 0 and connect["rss_idle_mb"] > 0

    assert targeted["notifications"] == 100 and targeted["accepted"] == 100, targeted["statuses"]
    assert targeted["http_errors"] == 0
    assert targeted["expected"] == 200 and targeted["delivered"] == 200  # both devices of each user
    assert targeted["lost"] == 0 and targeted["duplicates"] == 0 and targeted["misrouted"] == 0
    assert 0 < targeted["p50_ms"] <= targeted["p99_ms"] <= targeted["max_ms"]
    assert targeted["server_cpu_s"] > 0 and targeted["deliveries_per_cpu_s"] > 0

    assert broadcast["accepted"] == 5 and broadcast["sockets"] == 10
    assert broadcast["delivered"] == 50 and broadcast["lost"] == 0 and broadcast["duplicates"] == 0
    assert broadcast["complete_broadcasts"] == 5 and broadcast["fanout_p99_ms"] is not None
