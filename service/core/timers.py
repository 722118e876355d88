"""TimerWheel: deadlines for many objects (every socket's ping, pong and token expiry) on one timer.

An event-loop timer per socket costs about 550 bytes each (uvloop's handle and libuv timer, a copy
of the context, a bound method, the arguments); an idle socket has two. Here a deadline is one small
object in its time slot's set, and the wheel keeps a single loop timer, for its earliest slot.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("service.timers")

# A slot's deadlines run together, up to this late and never early: liveness pings and token
# expiry need no finer timing, and a replica wakes at most this often for them.
RESOLUTION_SECONDS = 0.25


class Deadline:
    """`fn(owner)` at a time to come, unless cancelled first."""

    __slots__ = ("wheel", "slot", "owner", "fn")

    def __init__(self, wheel: TimerWheel, slot: int, owner: Any, fn: Callable[[Any], object]) -> None:
        self.wheel: TimerWheel | None = wheel
        self.slot = slot
        self.owner = owner
        self.fn = fn

    def cancel(self) -> None:
        wheel, self.wheel = self.wheel, None
        if wheel is not None:
            wheel.discard(self.slot, self)


class TimerWheel:
    """One loop timer for any number of deadlines; each deadline is a set member until it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION_SECONDS) -> None:
        self._loop = loop
        self._resolution = resolution
        # A slot holds its one deadline as is, and a set only once it has two: with deadlines spread
        # thin (tokens expiring at all hours), most slots have one, and an empty set is 216 bytes.
        self._slots: dict[int, Deadline | set[Deadline]] = {}
        # The slots in time order, for the next one due without a scan of all of them. A slot emptied
        # by cancels stays here until due (or until the heap is rebuilt, at twice the slots' number).
        self._order: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._armed: int | None = None  # the slot the loop timer is set for

    def call_later(self, delay: float, owner: Any, fn: Callable[[Any], object]) -> Deadline:
        """Run `fn(owner)` in `delay` seconds (a plain function and its argument: no bound method
        or closure is kept per deadline)."""
        return self.call_at(self._loop.time() + max(0.0, delay), owner, fn)

    def call_at(self, when: float, owner: Any, fn: Callable[[Any], object], reuse: Deadline | None = None) -> Deadline:
        """`call_later` at the loop time `when`; with `reuse`, a deadline of this wheel that has run
        or been cancelled is set again rather than a new one made (what comes round often, a
        socket's keepalive, then makes no object each time)."""
        # Rounded first: a time on the grid plus an interval (0.05 * k + 0.1) can land a hair past
        # its slot in floating point, and would otherwise wait a whole slot more.
        slot = math.ceil(round(when / self._resolution, 6))
        if reuse is None:
            deadline = Deadline(self, slot, owner, fn)
        else:
            reuse.cancel()
            deadline, deadline.wheel, deadline.slot, deadline.owner, deadline.fn = reuse, self, slot, owner, fn
        self._add(slot, deadline)
        return deadline

    def time_of(self, deadline: Deadline) -> float:
        """The loop time a deadline of this wheel is (or was) set for: its slot's, on the wheel's grid."""
        return deadline.slot * self._resolution

    def _add(self, slot: int, deadline: Deadline) -> None:
        members = self._slots.get(slot)
        if members is None:
            self._slots[slot] = deadline
            self._add_slot(slot)
        elif isinstance(members, Deadline):
            self._slots[slot] = {members, deadline}
        else:
            members.add(deadline)
        if self._armed is None or slot < self._armed:
            self._arm(slot)

    def discard(self, slot: int, deadline: Deadline) -> None:
        members = self._slots.get(slot)
        if members is deadline:
            del self._slots[slot]  # the loop timer may still fire for it, and find nothing due
        elif isinstance(members, set):
            members.discard(deadline)
            if not members:
                del self._slots[slot]

    def _add_slot(self, slot: int) -> None:
        order = self._order
        if len(order) > 2 * len(self._slots) + 64:
            order[:] = self._slots
            heapq.heapify(order)
        else:
            heapq.heappush(order, slot)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = slot
        self._timer = self._loop.call_at(slot * self._resolution, self._fire)

    def _fire(self) -> None:
        self._timer = self._armed = None
        # uvloop's timers count whole milliseconds, so the timer can fire a hair before its slot.
        last = math.floor((self._loop.time() + 0.002) / self._resolution)
        order, due = self._order, []
        while order and order[0] <= last:
            due.append(heapq.heappop(order))
        # Deadlines the callbacks add, even for now, wait for the next turn of the loop.
        for slot in due:
            members = self._slots.pop(slot, None)
            if members is None:
                continue  # emptied by cancels, or a second entry for one slot
            for deadline in (members,) if isinstance(members, Deadline) else members:
                deadline.wheel = None
                try:
                    deadline.fn(deadline.owner)
                except Exception:
                    logger.exception("a timed callback failed")
        while order and order[0] not in self._slots:
            heapq.heappop(order)
        if order and self._armed != order[0]:
            self._arm(order[0])
