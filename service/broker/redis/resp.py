"""RawConnection: RESP written and read directly, on a connection that redis-py opened.

The two hot paths, publishing and reading the subscription, skip redis-py's per-command and
per-message layers (pool checkout, argument packing, a parse call, a dict per message): commands
are bytes written as they are, and replies are parsed by hiredis in batches, as many as one read
brought in. redis-py still makes the connection, so URL, TLS, AUTH and SELECT are as configured.
"""

from __future__ import annotations

import contextlib
from typing import Any

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


class RawConnection:
    """One connection, RESP2 in and out; an error reply comes back as a ResponseError object."""

    __slots__ = ("_conn", "_reader", "_writer", "_parser")

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._reader = conn._reader
        self._writer = conn._writer
        self._parser = hiredis.Reader(encoding="utf-8", replyError=ResponseError)

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
        try:
            self._writer.write(data)
        except Exception as exc:  # noqa: BLE001 - uvloop raises RuntimeError once the transport is closed
            raise RedisConnectionError("the connection to Redis is closed") from exc

    async def replies(self) -> list[Any]:
        """Every reply that has arrived, after waiting for at least one; raises once the connection is gone."""
        parser = self._parser
        while (reply := parser.gets()) is False:
            data = await self._reader.read(65536)
            if not data:
                raise RedisConnectionError("Redis closed the connection")
            parser.feed(data)
        replies = [reply]
        while (reply := parser.gets()) is not False:
            replies.append(reply)
        return replies

    def abort(self) -> None:
        """Drop the connection at once: nothing more is sent or read on it."""
        with contextlib.suppress(Exception):
            self._writer.transport.abort()
        # redis-py must not try to reuse or close what it no longer owns.
        self._conn._reader = self._conn._writer = None
