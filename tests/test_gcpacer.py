"""GcPacer (service/server/gcpacer.py): CPython's full collections held back while sockets pour in, and only then."""

from __future__ import annotations

import asyncio
import gc
import logging
import platform
import weakref

from service.server import gcpacer
from service.server.gcpacer import GcPacer


async def _until(check, seconds: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


class _Cycle:
    """Garbage only a full collection frees: a cycle that has reached the oldest generation."""

    def __init__(self) -> None:
        self.me = self


def _old_garbage() -> weakref.ref[_Cycle]:
    cycle = _Cycle()
    gc.collect(1)  # it survives the young collections while referenced, so it lands in the oldest generation
    return weakref.ref(cycle)


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


async def test_full_collections_wait_for_the_storm_to_pass_then_are_cpythons_again():
    before = gc.get_threshold()
    connections: list[int] = []
    kept: list[list[int]] = []  # what arriving sockets leave behind: long-lived tracked objects
    pacer = GcPacer(connections, interval=0.02, storm=1000, max_delay=60)
    pacer.start()
    try:
        assert gc.get_threshold() == before, "outside a storm, CPython's own rule"
        garbage = _old_garbage()
        full_before = _full_collections()
        for _ in range(10):  # sockets arriving: 1,500 a second, each leaving objects that live on
            connections.extend(range(30))
            kept.extend([n] for n in range(20_000))
            await asyncio.sleep(0.02)
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 1_000_000
        assert pacer.held == 1 and pacer.holding_since is not None
        assert _full_collections() == full_before, "no full collection during the storm"
        assert garbage() is not None, "nor its garbage freed"
        # The arrivals stop: the full collection that is due runs on CPython's rule again, and frees it.
        assert await _until(lambda: gc.get_threshold() == before)
        assert pacer.holding_since is None
        for _ in range(100):
            if garbage() is None:
                break
            kept.extend([n] for n in range(20_000))  # what a replica goes on allocating
            await asyncio.sleep(0)
        assert garbage() is None and _full_collections() > full_before, "freed by CPython's own full collection"
    finally:
        await pacer.stop()
    assert gc.get_threshold() == before


def test_the_pacer_knows_which_collectors_it_is_written_for(caplog):
    """CPython 3.11 to 3.13 only: 3.14's incremental collector ignores the third threshold. This
    interpreter is one the tests ran on; elsewhere the pacer stays off and says so in one line."""
    assert gcpacer.supported(), "the tests run on an interpreter the pacer supports"
    assert gcpacer.supported("CPython", (3, 13)) and not gcpacer.supported("CPython", (3, 14))
    assert not gcpacer.supported("CPython", (3, 10)) and not gcpacer.supported("PyPy", (3, 11))


async def test_outside_the_supported_versions_it_stays_off_and_says_so(caplog, monkeypatch):
    before = gc.get_threshold()
    monkeypatch.setattr(gcpacer, "SUPPORTED", ((3, 0), (3, 1)))
    connections: list[int] = []
    pacer = GcPacer(connections, interval=0.02, storm=1000)
    with caplog.at_level(logging.INFO, logger="service"):
        pacer.start()
    try:
        lines = [r.getMessage() for r in caplog.records if "not paced" in r.getMessage()]
        assert len(lines) == 1 and platform.python_version() in lines[0], caplog.records
        for _ in range(5):
            connections.extend(range(30))
            await asyncio.sleep(0.02)
        assert pacer.held == 0 and gc.get_threshold() == before, "off: CPython's own rule throughout"
    finally:
        await pacer.stop()


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
