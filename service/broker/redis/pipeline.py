"""AutoPipeline: one Redis connection that carries every publish of a replica.

redis-py spends more CPU per call than the publish itself costs Redis: a pool checkout, packing each
argument, a write and a drain, a parse call and a release, per command. Publishes are independent
and Redis answers in order, so they share one connection instead: each call appends its packed
command to a buffer, the buffer goes out in one write per event-loop turn (so concurrent publishes
pipeline by themselves), and one reader feeds the replies to hiredis and hands them back in order.

The deadline is kept per connection, not per call: replies come in order, so the oldest command
waiting is the only one that can be late first. When it is, Redis is hung or the link is half-open,
and the connection is dropped with every command on it; the next call reconnects.

Replicated acknowledgement (`execute(..., acknowledged=True)`): each write that carries such
commands ends with one `WAIT <replicas> <ms>`, so the commands before it are confirmed by the
replicas together; WAIT blocks the connection while it waits, and one per write rather than one per
command keeps that to once per event-loop turn.

A READONLY reply means the node is no longer the primary: the connection is dropped with every
command on it, and `on_broken` (as for any dropped connection) lets the owner look for the primary.

The connection is a `RawConnection` (see resp.py): made by redis-py, then written and read directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from .resp import RawConnection, bulk, command

logger = logging.getLogger("service.broker")

_ASKING = command("ASKING")


class NotReplicated(RedisError):
    """Fewer replicas than required confirmed the write in time (it may still reach them)."""


@dataclass(frozen=True, slots=True)
class Lua:
    """A script, known to Redis by its SHA1 once it has run."""

    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> Lua:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())

    def heads(self, parts: int, keys: int) -> dict[str, bytes]:
        """The start of the raw command that runs it with `parts` arguments in all, up to its `keys`
        key count: by EVALSHA, and by EVAL for when Redis lost it."""
        return {
            run: f"*{parts}\r\n".encode() + bulk(run) + bulk(text) + bulk(keys)
            for run, text in (("EVALSHA", self.sha), ("EVAL", self.text))
        }


class _Link:
    """One connected socket: commands out, replies matched to their callers in order."""

    __slots__ = (
        "conn",
        "loop",
        "pending",
        "sent_at",
        "out",
        "flush_scheduled",
        "watchdog",
        "reader_task",
        "broken",
        "acked",
    )

    def __init__(self, conn: RawConnection) -> None:
        self.conn = conn
        # Kept, not asked for per command: CPython 3.11's get_running_loop makes a getpid system call.
        self.loop = asyncio.get_running_loop()
        self.pending: deque[asyncio.Future[Any] | _Then] = deque()
        self.sent_at: deque[float] = deque()  # loop time each pending command was queued
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.watchdog: asyncio.TimerHandle | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.broken: BaseException | None = None
        self.acked: asyncio.Future[Any] | None = None  # the WAIT that ends the next write, if any

    def fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        kind = TimeoutError if isinstance(exc, TimeoutError) else RedisConnectionError
        while self.pending:
            waiter = self.pending.popleft()
            if not waiter.done():
                waiter.set_exception(kind(str(exc) or type(exc).__name__))
        self.sent_at.clear()
        self.out.clear()
        if self.acked is not None and not self.acked.done():
            self.acked.set_exception(kind(str(exc) or type(exc).__name__))
        if self.watchdog is not None:
            self.watchdog.cancel()


class _Then:
    """Stands for a Future among the replies waited for (`AutoPipeline.send`): the reply goes to a
    callback as it is read. The callback runs inside the connection's read callback, so whatever it
    raises is logged here: it must not end the connection, nor keep the replies after it from theirs."""

    __slots__ = ("then", "called")

    def __init__(self, then: Callable[[Any, BaseException | None], None]) -> None:
        self.then = then
        self.called = False

    def done(self) -> bool:
        return self.called

    def set_result(self, reply: Any) -> None:
        self._call(reply, None)

    def set_exception(self, exc: BaseException) -> None:
        self._call(None, exc)

    def _call(self, reply: Any, exc: BaseException | None) -> None:
        self.called = True
        try:
            self.then(reply, exc)
        except Exception:
            logger.exception("a reply's callback failed")


class AutoPipeline:
    """Send commands over one shared connection; made on first use and again after any failure.

    Every call gets its reply, an error reply raised as ResponseError, or within `deadline` seconds
    a TimeoutError or redis ConnectionError."""

    def __init__(
        self,
        client: aioredis.Redis,
        deadline: float,
        replicas: int = 0,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._deadline = deadline
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._replicas = replicas
        # WAIT answers before the deadline drops the connection, so a shortfall is an answer, not a timeout.
        self._wait = command("WAIT", replicas, max(1, int(deadline * 800))) if replicas else b""
        self._on_broken = on_broken

    async def evaluate(
        self,
        script: Lua,
        keys: Sequence[str],
        args: Sequence[str | int],
        acknowledged: bool = False,
        asking: bool = False,
    ) -> Any:
        """Run a script on the shared connection (loading it first if Redis does not know it)."""
        tail = (len(keys), *keys, *args)
        try:
            return await self.execute(command("EVALSHA", script.sha, *tail), acknowledged, asking=asking)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.execute(command("EVAL", script.text, *tail), acknowledged, asking=asking)

    async def execute(
        self, command: bytes, acknowledged: bool = False, key: str | None = None, asking: bool = False
    ) -> Any:
        """Send one command, already in RESP (see resp.py), and return its reply; `acknowledged`:
        only once the replicas asked for confirm it (NotReplicated otherwise). `key` is for a
        router (this connection serves every key); `asking`: sent right after an ASKING (a slot
        being moved to this node, in a cluster)."""
        link = self._link
        if link is None or link.broken is not None:
            async with asyncio.timeout(self._deadline):
                link = await self._connect()
        loop = link.loop
        if asking:
            told: asyncio.Future[Any] = loop.create_future()
            told.add_done_callback(_retrieve)
            self._queue(link, _ASKING, told)
        waiter: asyncio.Future[Any] = loop.create_future()
        self._queue(link, command, waiter)
        acked = None
        if acknowledged and self._replicas:
            acked = link.acked
            if acked is None:
                acked = link.acked = loop.create_future()
                acked.add_done_callback(_retrieve)
        reply = await waiter
        if acked is not None:
            confirmed = await acked
            if confirmed < self._replicas:
                raise NotReplicated(f"{confirmed} of {self._replicas} replicas confirmed within the deadline")
        return reply

    def send(self, command: bytes, then: Callable[[Any, BaseException | None], None]) -> bool:
        """`execute` with no coroutine: `then(reply, None)`, or `then(None, error)` on an error reply
        or a failure (as `execute` raises them), is called once, from the reply's read callback.
        False, with nothing sent, where the call has to be awaited: no connection yet, or a broken
        one (`execute` connects again), or replicated acknowledgement to wait for."""
        link = self._link
        if link is None or link.broken is not None or self._replicas:
            return False
        self._queue(link, command, _Then(then), from_read=True)
        return True

    def _queue(self, link: _Link, command: bytes, waiter: asyncio.Future[Any] | _Then, from_read: bool = False) -> None:
        """Queue one command for the next write, its reply for `waiter`. The write goes out on the
        loop's next turn, after one more poll, so that the commands of what that poll reads share it:
        a task's `execute` runs on a turn of its own already; a read callback's `send` (`from_read`)
        waits a turn more, else it wrote a command per read (measured: more writes, more reads)."""
        loop = link.loop
        link.out.append(command)
        link.pending.append(waiter)
        link.sent_at.append(loop.time())
        if not link.flush_scheduled:
            link.flush_scheduled = True
            if from_read:
                loop.call_soon(loop.call_soon, self._flush, link)
            else:
                loop.call_soon(self._flush, link)
        if link.watchdog is None:
            link.watchdog = loop.call_later(self._deadline, self._watch, link)

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._link is not None:
            self._drop(self._link, RedisConnectionError("closed"), quietly=True)

    def drop_link(self, reason: str, keep: Callable[[RawConnection], bool]) -> None:
        """Drop the connection unless `keep` approves of it; commands on it fail, the next call reconnects."""
        link = self._link
        if link is not None and not keep(link.conn):
            self._drop(link, RedisConnectionError(reason), quietly=True)
        if self._connecting is not None and not self._connecting.done():
            # It may be stuck on its way to the old node: the next call starts afresh, and this one,
            # should it still succeed, is not used (see `_open`).
            self._connecting = None

    def _flush(self, link: _Link) -> None:
        link.flush_scheduled = False
        if not link.out or link.broken is not None:
            return
        if link.acked is not None:
            link.out.append(self._wait)
            link.pending.append(link.acked)
            link.sent_at.append(link.loop.time())
            link.acked = None
        data = b"".join(link.out) if len(link.out) > 1 else link.out[0]
        link.out.clear()
        try:
            link.conn.write(data)
        except Exception as exc:  # noqa: BLE001 - the socket is gone; every waiter hears it
            self._drop(link, exc)

    def _watch(self, link: _Link) -> None:
        """Check the oldest command waiting; one timer per connection, re-armed while commands wait."""
        link.watchdog = None
        if link.broken is not None or not link.sent_at:
            return
        loop = asyncio.get_running_loop()
        late_by = loop.time() - link.sent_at[0] - self._deadline
        if late_by >= 0:
            self._drop(link, TimeoutError(f"no reply from Redis within {self._deadline:g}s"))
        else:
            link.watchdog = loop.call_later(-late_by, self._watch, link)

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
        conn = await RawConnection.open(self._client)
        if self._connecting is not asyncio.current_task():
            conn.abort()
            raise RedisConnectionError("the connection was abandoned while it was being made")
        link = _Link(conn)
        link.reader_task = asyncio.get_running_loop().create_task(self._read(link), name="redis-pipeline-reader")
        self._link = link
        return link

    async def _read(self, link: _Link) -> None:
        link.conn.sink(lambda replies: self._replied(link, replies))
        try:
            await link.conn.broken()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure ends this link
            self._drop(link, exc)

    @staticmethod
    def _replied(link: _Link, replies: list[Any]) -> None:
        """Replies in the order of the commands waiting (called as they arrive, see resp.py)."""
        pending, sent_at = link.pending, link.sent_at
        demoted = None
        for reply in replies:
            waiter = pending.popleft()
            sent_at.popleft()
            if isinstance(reply, ResponseError) and str(reply).startswith("READONLY"):
                demoted = reply
            if waiter.done():
                continue  # its caller was cancelled
            if isinstance(reply, ResponseError):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
        if demoted is not None:
            raise RedisConnectionError(f"no longer the primary: {demoted}")

    def _drop(self, link: _Link, exc: BaseException, quietly: bool = False) -> None:
        link.fail(exc)
        if self._link is link:
            self._link = None
        if link.reader_task is not None and link.reader_task is not asyncio.current_task():
            link.reader_task.cancel()
        link.conn.abort()
        if not quietly and self._on_broken is not None:
            self._on_broken()


def _retrieve(future: asyncio.Future[Any]) -> None:
    """A failure whose waiters all gave up (or heard of it otherwise) is not an unhandled error:
    they got their 503."""
    if not future.cancelled():
        future.exception()
