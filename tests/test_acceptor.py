"""The listening socket (service/server/acceptor.py): a burst of connections is taken in one turn of the loop."""

from __future__ import annotations

import asyncio
import socket

from service.server.acceptor import Acceptor


class _Echo(asyncio.Protocol):
    made: list[_Echo] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


async def test_every_pending_connection_is_taken_in_one_turn_and_served():
    _Echo.made = []
    acceptor = Acceptor.bind("127.0.0.1", 0, 1024, _Echo)
    port = acceptor.sockets[0].getsockname()[1]
    clients = []
    try:
        # 300 connections queued in the kernel before the loop gets a turn: a reconnect storm's arrivals.
        for _ in range(300):
            client = socket.create_connection(("127.0.0.1", port))
            clients.append(client)
        # No turn of the loop has run since they connected (the loop was held by the connects above): one
        # call, as one turn makes, takes all 300.
        assert acceptor.accept_pending() == 300
        for _ in range(50):
            if len(_Echo.made) == 300:
                break
            await asyncio.sleep(0.01)
        assert len(_Echo.made) == 300
        last = clients[-1]
        last.sendall(b"publish")
        last.settimeout(5)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, last.recv, 16) == b"PUBLISH"
    finally:
        acceptor.close()
        for client in clients:
            client.close()
        for protocol in _Echo.made:
            protocol.transport.close()
    assert not acceptor.is_serving()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        raise AssertionError("still listening after close()")
    except ConnectionRefusedError:
        pass
