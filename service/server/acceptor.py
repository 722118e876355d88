"""Acceptor: the listening sockets, every pending connection taken at each turn of the event loop.

uvloop's own server accepts one connection per turn (libuv has done so since 1.45, relying on the
socket staying readable). A turn is short when the replica is quiet, but in a reconnect storm each
one carries dozens of handshakes, and the connections behind them wait in the kernel's accept
queue: with a dead replica's sockets arriving, 750 of them queued on each survivor, and a backend's
new keep-alive connection, its publish already sent, waited up to a second and a half behind them
before the replica read a byte of it (docs/reliability.md, "Reconnect storm"). Taking every pending
connection at once puts the waiting where it belongs: handshakes are paced after they are accepted
(`server/admission.py`), and a publish is read at once.

It listens on every address the host resolves to (as asyncio's own servers do). Out of file
descriptors (EMFILE, ENFILE), a connection stays queued and the socket stays readable: retried at
every turn, that is a busy loop and a log line per turn. Accepting pauses for a second instead,
logged once until a connection is accepted again, and counted.

It stands where uvicorn keeps its servers (`Server.servers`): `close()` stops listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("service")

# At most this many connections a turn, so that a flood cannot hold the loop for long either.
ACCEPT_BATCH = 512
# Out of descriptors: accepting waits this long before trying again (asyncio's own servers do too).
STARVED_RETRY_SECONDS = 1.0
_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Accepts on its listening sockets, up to ACCEPT_BATCH connections whenever one is readable."""

    def __init__(
        self,
        sockets: list[socket.socket],
        protocol_factory: Callable[[], asyncio.Protocol],
        on_starved: Callable[[], None] = lambda: None,
    ) -> None:
        self.sockets = sockets
        self._factory = protocol_factory
        self._on_starved = on_starved  # counts each pause
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = True
        self._retry: asyncio.TimerHandle | None = None
        self._pauses = 0  # in the current episode of starvation; 0: not starved
        for sock in sockets:
            sock.setblocking(False)
        self._read()

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        backlog: int,
        factory: Callable[[], asyncio.Protocol],
        on_starved: Callable[[], None] = lambda: None,
    ) -> Acceptor:
        """Listen on every address `host` resolves to (`localhost` may be 127.0.0.1 and ::1)."""
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
        return cls.listen(addresses, backlog, factory, on_starved)

    @classmethod
    def listen(
        cls,
        addresses: list[tuple[socket.AddressFamily, Any]],
        backlog: int,
        factory: Callable[[], asyncio.Protocol],
        on_starved: Callable[[], None] = lambda: None,
    ) -> Acceptor:
        """Listen on each (family, address); all or none."""
        sockets: list[socket.socket] = []
        try:
            for family, address in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    # Otherwise `::` would take the IPv4 port that `0.0.0.0` is about to bind.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return cls(sockets, factory, on_starved)

    def accept_pending(self, sock: socket.socket) -> int:
        """Take every connection waiting on `sock` (up to ACCEPT_BATCH) and hand each to a new
        protocol; how many were taken."""
        taken = 0
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except ConnectionAbortedError:
                continue  # the peer left while queued
            except OSError as exc:
                if exc.errno in _STARVED:
                    self._pause(exc)
                else:  # this connection's own trouble (the kernel drops it): the next is taken next turn
                    logger.warning("accepting a connection failed: %s", exc)
                return taken
            if self._pauses:
                logger.warning("accepting connections again, after %d pauses", self._pauses)
                self._pauses = 0
            taken += 1
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return taken

    def _pause(self, exc: OSError) -> None:
        """Stop reading the listening sockets for a while: the connection stays queued meanwhile."""
        self._on_starved()
        if not self._pauses:
            logger.error(
                "cannot accept connections: %s; paused, retried every %gs (logged once until one is accepted)",
                exc.strerror or exc,
                STARVED_RETRY_SECONDS,
            )
        self._pauses += 1
        self._unread()
        self._retry = self._loop.call_later(STARVED_RETRY_SECONDS, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._read()

    def _read(self) -> None:
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self.accept_pending, sock)

    def _unread(self) -> None:
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the peer left before its transport was made
            conn.close()

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._unread()
        for sock in self.sockets:
            sock.close()

    def is_serving(self) -> bool:
        return self._serving

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks)
