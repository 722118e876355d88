"""RawConnection: RESP written and read directly, on a connection that redis-py opened.

The two hot paths, publishing and reading the subscription, skip redis-py's per-command and
per-message layers (pool checkout, argument packing, a parse call, a dict per message): commands
are bytes written as they are, and replies are parsed by hiredis in batches, as many as one read
brought in. redis-py still makes the connection, so URL, TLS, AUTH and SELECT are as configured;
then the transport's protocol is ours, and what arrives is parsed as it arrives. A reader that
wants every reply as it comes (the pipeline's, the subscription's) gives a `sink`, called with
each batch from the transport's own callback: no task wakes per read, and no stream buffer copies
the bytes on their way to the parser.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, NoReturn

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError


def bulk(arg: str | int | bytes) -> bytes:
    """One argument of a command in RESP, so that constant parts can be encoded once."""
    raw = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%b\r\n" % (len(raw), raw)


def command(*args: str | int | bytes) -> bytes:
    """One whole command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(map(bulk, args))


class _Arrivals(asyncio.Protocol):
    """The transport's protocol once a RawConnection has it: each read goes straight to the parser."""

    __slots__ = ("conn",)

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.conn.received(data)

    def eof_received(self) -> bool:
        self.conn.fail(RedisConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.fail(RedisConnectionError(f"the connection to Redis was lost: {exc}" if exc else "closed"))


Sink = Callable[[list[Any]], None]


class RawConnection:
    """One connection, RESP2 in and out; an error reply comes back as a ResponseError object.

    Replies are read with `replies()`, or handed to a `sink` as they arrive; a sink that raises
    ends the connection, and `broken()` raises what ended it."""

    __slots__ = ("_conn", "_transport", "_parser", "_ready", "_waiter", "_error", "_sink")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self._ready: list[Any] = []  # parsed, not yet taken by `replies()`
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._sink: Sink | None = None
        # redis-py read its handshake's replies in full, and RESP2 sends nothing unasked, so its
        # stream reader holds nothing here: from now on every byte comes to `received`.
        self._transport: asyncio.Transport = conn._writer.transport
        self._transport.set_protocol(_Arrivals(self))

    @classmethod
    async def open(cls, client: aioredis.Redis) -> RawConnection:
        conn = client.connection_pool.make_connection()
        try:
            await conn.connect()
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise
        return cls(conn)

    @property
    def address(self) -> tuple[str, int] | None:
        """Where the connection went (host, port); None for a unix socket."""
        host, port = getattr(self._conn, "host", None), getattr(self._conn, "port", None)
        return None if host is None or port is None else (str(host), int(port))

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise RedisConnectionError("the connection to Redis is closed")
        try:
            self._transport.write(data)
        except Exception as exc:  # noqa: BLE001 - uvloop raises RuntimeError once the transport is closed
            raise RedisConnectionError("the connection to Redis is closed") from exc

    async def replies(self) -> list[Any]:
        """Every reply that has arrived, after waiting for at least one; raises once the connection is gone."""
        while not self._ready:
            if self._error is not None:
                raise self._error
            await self._next()
        ready, self._ready = self._ready, []
        return ready

    def sink(self, sink: Sink) -> None:
        """Hand every batch of replies to `sink` as it arrives (those already here first), from now on."""
        self._sink = sink
        if self._ready:
            ready, self._ready = self._ready, []
            self._deliver(ready)

    async def broken(self) -> NoReturn:
        """Wait until the connection ends, and raise what ended it."""
        while self._error is None:
            await self._next()
        raise self._error

    async def _next(self) -> None:
        """Wait for the next arrival, or the end."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def abort(self) -> None:
        """Drop the connection at once: nothing more is sent or read on it."""
        self.fail(RedisConnectionError("the connection to Redis was dropped"))
        # redis-py must not try to reuse or close what it no longer owns.
        self._conn._reader = self._conn._writer = None

    def received(self, data: bytes) -> None:
        """What the transport read: parsed, then handed to the sink or kept for `replies()`."""
        parser = self._parser
        try:
            parser.feed(data)
            reply = parser.gets()
            if reply is False:
                return
            replies = [reply]
            while (reply := parser.gets()) is not False:
                replies.append(reply)
        except hiredis.ProtocolError as exc:
            self.fail(RedisConnectionError(f"Redis sent what is not RESP: {exc}"))
            return
        if self._sink is not None:
            self._deliver(replies)
            return
        self._ready += replies
        self._wake()

    def _deliver(self, replies: list[Any]) -> None:
        assert self._sink is not None
        try:
            self._sink(replies)
        except Exception as exc:  # noqa: BLE001 - the reader's way to end the connection
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """End the connection with `exc`: what `replies()` and `broken()` raise from now on."""
        if self._error is None:
            self._error = exc
            self._sink = None
            self._transport.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
