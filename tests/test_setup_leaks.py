"""A client that leaves while its socket is being set up leaves nothing registered behind.

The clients here reset their TCP connection (RST) right after the server started answering their
`/events` request, while the replica registers them, subscribes and reads history: the moment a
phone that lost its network leaves a half-made stream behind.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import httpx

from .test_faults import metrics, wait_for
from .utils import TIMEOUT, Replica, cluster_env, publish, publisher_headers, started, token

DROPS = 20


def _reset_during_setup(replica: Replica, user: str, since: str) -> None:
    """Ask for the user's SSE stream, wait for the first bytes of the answer, then send a RST."""
    with socket.create_connection(("127.0.0.1", replica.port), timeout=TIMEOUT) as sock:
        request = (
            f"GET /events?since={since} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {token(user)}\r\nAccept: text/event-stream\r\n\r\n"
        )
        sock.sendall(request.encode())
        assert sock.recv(1).startswith(b"H")  # the response has begun: the stream is being set up
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _offline(http: httpx.AsyncClient, via: Replica, user: str) -> bool:
    """A publish to the user answers that none of their sockets is online, on any replica."""
    response = await publish(http, via, user, "probe")
    assert response.status_code == 202, response.text
    return response.json()["online"] == 0


async def test_sse_reset_during_setup_leaves_no_registration(redis_server, http):
    """20 SSE clients of one user on replica B reset their connection during set-up: afterwards the
    user is offline for replica A's publishes, B holds no connection, the user may open a stream
    again (no 429), and broadcasts pile up nowhere (no slow consumer, ever)."""
    env = cluster_env(redis_server, NOTIFY_MAX_CONNECTIONS_PER_USER="5", NOTIFY_SEND_QUEUE_FRAMES="5")
    with started(Replica(env), Replica(env)) as (a, b):
        user = "setup-dropper"
        since = (await publish(http, a, user, "before")).json()["id"]  # a resume reads history too
        for _ in range(DROPS):
            await asyncio.to_thread(_reset_during_setup, b, user, since)

        async def nothing_left() -> bool:
            return (await metrics(http, b)).get("notify_connections", -1) == 0

        await wait_for(nothing_left, 3 * TIMEOUT)
        # Presence reaches Redis in the background: poll until it does.
        await wait_for(lambda: _offline(http, a, user), TIMEOUT)

        for n in range(10):
            assert (await publish(http, a, None, "broadcast", n)).status_code == 202
        async with http.stream("GET", b.url + "/events", headers={"Authorization": f"Bearer {token(user)}"}) as sse:
            assert sse.status_code == 200
        assert (await metrics(http, b)).get("notify_slow_consumers_total", 0) == 0
        assert (await http.get(b.url + "/readyz", headers=publisher_headers())).status_code == 200
