"""What the server hands the layers above through the ASGI scope, so that they need no library's
internals: each helper here relies on how uvicorn behaves, and is offered only by this server.

`send_eagerly` runs an ASGI `send` as far as it goes without waiting. uvicorn's WebSocket send
writes the frame and returns without suspending while the peer keeps up, and suspends on an
asyncio future (its flow control) when it does not: driving the coroutine by hand up to that point
saves a task and a loop turn per frame for every socket that keeps up (`delivery.connection`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any


def send_eagerly(send: Coroutine[Any, Any, None]) -> Awaitable[None] | None:
    """Run `send` up to its first wait: None when it completed, else what finishes it, to be awaited
    by the task that writes the backlog. A send that fails at once raises here."""
    try:
        waiting_on = send.send(None)
    except StopIteration:
        return None
    return _Rest(send, waiting_on)


class _Rest:
    """The rest of a send started by hand. Not a coroutine: dropped unawaited (its socket went away
    first), it leaves no warning, and the suspended send is closed when collected."""

    __slots__ = ("_send", "_waiting_on")

    def __init__(self, send: Coroutine[Any, Any, None], waiting_on: Any) -> None:
        self._send = send
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, None, None]:
        return _resume(self._send, self._waiting_on).__await__()


async def _resume(coro: Coroutine[Any, Any, None], waiting_on: Any) -> None:
    """Drive a coroutine that was started by hand and suspended on `waiting_on`, as a Task would."""
    while True:
        try:
            if waiting_on is None:
                await asyncio.sleep(0)
            else:
                # As a Task does on taking a yielded future: without this, awaiting it again raises
                # "await wasn't used with future", and the send would be lost with its socket's writes.
                if isinstance(waiting_on, asyncio.Future):
                    waiting_on._asyncio_future_blocking = False
                await waiting_on
        except asyncio.CancelledError:
            if not (isinstance(waiting_on, asyncio.Future) and waiting_on.cancelled()):
                coro.close()
                raise
        except Exception:  # noqa: BLE001,S110 - the coroutine sees the same outcome when resumed
            pass
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return
