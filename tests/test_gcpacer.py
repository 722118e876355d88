"""GcPacer (service/gcpacer.py): full collections held back while sockets pour in, and never lost."""

from __future__ import annotations

import asyncio
import gc
import weakref

from service.gcpacer import GcPacer


class _Cycle:
    """Garbage only a collection frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


def _garbage() -> weakref.ref[_Cycle]:
    return weakref.ref(_Cycle())


async def _until(check, seconds: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def test_a_due_collection_waits_for_the_storm_to_pass_then_frees_the_garbage():
    before = gc.get_threshold()
    connections: list[int] = []
    # growth 0: a full collection is due at every check; 20 arrivals a check is a storm.
    pacer = GcPacer(connections, interval=0.02, growth=0.0, storm=1000, max_delay=60)
    pacer.start()
    try:
        assert gc.get_threshold()[2] > 1_000_000, "CPython's own full collections are off while the pacer runs"
        cycle = _garbage()
        for _ in range(20):  # sockets arriving: 1,000 a second and more
            connections.extend(range(30))
            await asyncio.sleep(0.02)
        assert pacer.deferred > 0
        # The young generations may have found it meanwhile; what matters is that the full
        # collection did not run during the storm, and does once it is over.
        assert pacer.collections == 0
        assert await _until(lambda: pacer.collections > 0)
        assert cycle() is None
    finally:
        await pacer.stop()
    assert gc.get_threshold() == before


async def test_a_collection_held_back_too_long_runs_during_the_storm():
    connections: list[int] = []
    pacer = GcPacer(connections, interval=0.02, growth=0.0, storm=1000, max_delay=0.2)
    pacer.start()
    try:
        for _ in range(40):
            connections.extend(range(30))
            await asyncio.sleep(0.02)
        assert pacer.deferred > 0 and pacer.collections > 0
    finally:
        await pacer.stop()


async def test_no_collection_before_the_heap_grows():
    pacer = GcPacer([], interval=0.01, growth=10.0)
    pacer.start()
    try:
        await asyncio.sleep(0.1)
        assert pacer.collections == 0 and not pacer.due()
    finally:
        await pacer.stop()
