"""A TCP proxy the tests own, between a replica and Redis, that can stall connections.

A stalled connection stays open on both sides but no byte crosses it either way: to the replica
it looks exactly like a half-open TCP connection (a peer that vanished, a NAT that forgot the
flow) or a network partition. It runs on its own thread and event loop, so a test that blocks its
own loop (starting a replica, sleeping) does not stall the proxy by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

_CHUNK = 65536


class _Link:
    """One proxied connection: two pumps, each gated by the same `open` event."""

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy
        self.open = asyncio.Event()
        self.open.set()
        self.writers: list[asyncio.StreamWriter] = []

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                # A stalled link holds what it read: nothing reaches the other side.
                await self.open.wait()
                if self.proxy.delay:  # a network's latency: each chunk arrives `delay` later, in order
                    asyncio.get_running_loop().call_later(self.proxy.delay, writer.write, data)
                    continue
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.proxy.delay:
                asyncio.get_running_loop().call_later(self.proxy.delay, self.close)
            else:
                self.close()

    def close(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.close()


class TcpProxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target_port>, started on a thread of its own; `delay`
    seconds of latency each way (a Redis across a network) when given."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._links: set[_Link] = set()
        self._stall_new = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def stall_existing(self) -> int:
        """Half-open TCP: every current connection goes silent; new ones work. Returns how many."""
        return int(self._call(self._set_existing(False)))

    def partition(self) -> None:
        """Nothing crosses any more, on current or new connections (they are accepted, then silent)."""
        self._call(self._partition(True))

    def heal(self) -> None:
        """Everything flows again, including what stalled connections were holding."""
        self._call(self._partition(False))

    def reset_all(self) -> None:
        """Close every proxied connection (both sides see the connection drop)."""
        self._call(self._reset())

    @property
    def connections(self) -> int:
        return len(self._links)

    # ---- on the proxy's loop

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset()

    async def _set_existing(self, flowing: bool) -> int:
        for link in self._links:
            (link.open.set if flowing else link.open.clear)()
        return len(self._links)

    async def _partition(self, on: bool) -> None:
        self._stall_new = on
        await self._set_existing(not on)

    async def _reset(self) -> None:
        for link in list(self._links):
            link.close()
        self._links.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        link = _Link(self)
        link.writers.append(client_writer)
        if self._stall_new:
            link.open.clear()
        self._links.add(link)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            link.close()
            self._links.discard(link)
            return
        link.writers.append(upstream_writer)
        try:
            await asyncio.gather(link.pump(client_reader, upstream_writer), link.pump(upstream_reader, client_writer))
        finally:
            self._links.discard(link)
