"""GcPacer (service/server/gcpacer.py): CPython's full collections held back while sockets pour in, and only then."""

from __future__ import annotations

import asyncio
import gc

from service.server.gcpacer import GcPacer


async def _until(check, seconds: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def test_full_collections_wait_for_the_storm_to_pass_then_are_cpythons_again():
    before = gc.get_threshold()
    connections: list[int] = []
    pacer = GcPacer(connections, interval=0.02, storm=1000, max_delay=60)
    pacer.start()
    try:
        assert gc.get_threshold() == before, "outside a storm, CPython's own rule"
        for _ in range(10):  # sockets arriving: 1,500 a second
            connections.extend(range(30))
            await asyncio.sleep(0.02)
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 1_000_000
        assert pacer.held == 1 and pacer.holding_since is not None
        # The arrivals stop: the full collection that is due runs on CPython's rule again.
        assert await _until(lambda: gc.get_threshold() == before)
        assert pacer.holding_since is None
    finally:
        await pacer.stop()
    assert gc.get_threshold() == before


async def test_a_storm_longer_than_max_delay_still_gets_a_full_collection():
    before = gc.get_threshold()
    connections: list[int] = []
    pacer = GcPacer(connections, interval=0.02, storm=1000, max_delay=0.2)
    pacer.start()
    try:
        full_before = gc.get_stats()[2]["collections"]
        for _ in range(30):  # 0.6 s of arrivals
            connections.extend(range(30))
            await asyncio.sleep(0.02)
        assert pacer.held == 1, "one storm, held back all along"
        assert gc.get_stats()[2]["collections"] > full_before, "but a full collection ran every 0.2 s of it"
    finally:
        await pacer.stop()
    assert gc.get_threshold() == before


async def test_a_quiet_replica_is_left_to_cpython():
    before = gc.get_threshold()
    connections = list(range(10))
    pacer = GcPacer(connections, interval=0.01)
    pacer.start()
    try:
        connections.append(1)  # one socket more: no storm
        await asyncio.sleep(0.1)
        assert pacer.held == 0 and gc.get_threshold() == before
    finally:
        await pacer.stop()
