"""Acceptor: the listening socket, every pending connection taken at each turn of the event loop.

uvloop's own server accepts one connection per turn (libuv has done so since 1.45, relying on the
socket staying readable). A turn is short when the replica is quiet, but in a reconnect storm each
one carries dozens of handshakes, and the connections behind them wait in the kernel's accept
queue: with a dead replica's sockets arriving, 750 of them queued on each survivor, and a backend's
new keep-alive connection, its publish already sent, waited up to a second and a half behind them
before the replica read a byte of it (docs/reliability.md, "Reconnect storm"). Taking every pending
connection at once puts the waiting where it belongs: handshakes are paced after they are accepted
(`server/admission.py`), and a publish is read at once.

It stands where uvicorn keeps its servers (`Server.servers`): `close()` stops listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

logger = logging.getLogger("service")

# At most this many connections a turn, so that a flood cannot hold the loop for long either.
ACCEPT_BATCH = 512


class Acceptor:
    """Accepts on one listening socket, up to ACCEPT_BATCH connections whenever it is readable."""

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        self.sockets = [sock]
        self._sock = sock
        self._factory = protocol_factory
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._serving = True
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self.accept_pending)

    @classmethod
    def bind(cls, host: str, port: int, backlog: int, factory: Callable[[], asyncio.Protocol]) -> Acceptor:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return cls(sock, factory)

    def accept_pending(self) -> int:
        """Take every connection waiting (up to ACCEPT_BATCH) and hand each to a new protocol;
        how many were taken."""
        for taken in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as exc:  # EMFILE and the like: the connection stays queued, tried next turn
                logger.warning("accepting a connection failed: %s", exc)
                return taken
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return ACCEPT_BATCH

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError:  # the peer left before its transport was made
            conn.close()

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def is_serving(self) -> bool:
        return self._serving

    async def wait_closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks)
