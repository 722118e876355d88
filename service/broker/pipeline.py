"""AutoPipeline: one Redis connection that carries every publish of a replica.

redis-py spends more CPU per call than the publish itself costs Redis: a pool checkout, packing each
argument, a write and a drain, a parse call and a release, per command. Publishes are independent
and Redis answers in order, so they share one connection instead: each call appends its packed
command to a buffer, the buffer goes out in one write per event-loop turn (so concurrent publishes
pipeline by themselves), and one reader feeds the replies to hiredis and hands them back in order.

The connection is made and authenticated by redis-py (URL, TLS, AUTH, SELECT, RESP version all as
configured); only the hot path bypasses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


def pack(*args: str | int | bytes) -> bytes:
    """One command in RESP, as Redis reads it."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        raw = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(raw), raw))
    return b"".join(parts)


class _Link:
    """One connected socket: commands out, replies matched to their callers in order."""

    __slots__ = ("conn", "pending", "out", "flush_scheduled", "reader_task", "broken")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pending: deque[asyncio.Future[Any]] = deque()
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.reader_task: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        while self.pending:
            waiter = self.pending.popleft()
            if not waiter.done():
                waiter.set_exception(RedisConnectionError(str(exc) or type(exc).__name__))
        self.out.clear()


class AutoPipeline:
    """Send commands over one shared connection; made on first use and again after any failure."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None

    async def execute(self, command: bytes) -> Any:
        """Send one packed command (see `pack`) and return its reply; an error reply is raised.

        A caller that gives up (its deadline passed) takes the connection down with it: a reply
        that is late may never come (half-open TCP, a stopped server), and the next call reconnects."""
        link = self._link
        if link is None or link.broken is not None:
            link = await self._connect()
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        link.out.append(command)
        link.pending.append(waiter)
        if not link.flush_scheduled:
            link.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush, link)
        try:
            return await waiter
        except asyncio.CancelledError:
            self._drop(link, TimeoutError("a Redis reply did not come in time"))
            raise

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._link is not None:
            self._drop(self._link, RedisConnectionError("closed"))

    def _flush(self, link: _Link) -> None:
        link.flush_scheduled = False
        if not link.out or link.broken is not None:
            return
        data = b"".join(link.out) if len(link.out) > 1 else link.out[0]
        link.out.clear()
        try:
            link.conn._writer.write(data)
        except Exception as exc:  # noqa: BLE001 - the socket is gone; every waiter hears it
            self._drop(link, exc)

    async def _connect(self) -> _Link:
        # Callers that arrive while a connection is being made wait for that one; an attempt that
        # already ended (its callers gave up before it failed or succeeded) is never handed out again.
        task = self._connecting
        if task is None or task.done():
            task = self._connecting = asyncio.get_running_loop().create_task(self._open())
            task.add_done_callback(_retrieve)
        link = await asyncio.shield(task)
        if self._connecting is task:
            self._connecting = None
        if link.broken is not None:
            raise RedisConnectionError("the Redis connection was lost while it was being made")
        return link

    async def _open(self) -> _Link:
        conn = self._pool.make_connection()
        try:
            await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise
        link = _Link(conn)
        link.reader_task = asyncio.get_running_loop().create_task(self._read(link), name="redis-pipeline-reader")
        self._link = link
        return link

    async def _read(self, link: _Link) -> None:
        parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        stream = link.conn._reader
        pending = link.pending
        try:
            while True:
                data = await stream.read(65536)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    waiter = pending.popleft()
                    if waiter.done():
                        continue  # its caller gave up; the link is being dropped anyway
                    if isinstance(reply, ResponseError):
                        waiter.set_exception(reply)
                    else:
                        waiter.set_result(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this link
            self._drop(link, exc)

    def _drop(self, link: _Link, exc: BaseException) -> None:
        link.fail(exc)
        if self._link is link:
            self._link = None
        if link.reader_task is not None and link.reader_task is not asyncio.current_task():
            link.reader_task.cancel()
        writer = link.conn._writer
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.transport.abort()
        link.conn._reader = link.conn._writer = None


def _retrieve(task: asyncio.Task[_Link]) -> None:
    """A failed attempt whose callers all gave up is not an unhandled error: they got their 503."""
    if not task.cancelled():
        task.exception()
