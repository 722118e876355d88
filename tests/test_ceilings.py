"""Connection ceilings: NOTIFY_MAX_CONNECTIONS (503) and NOTIFY_MAX_CONNECTIONS_PER_IP (429),
against real replicas, with sockets from a second loopback address for the per-address cap."""

from __future__ import annotations

import asyncio
import resource
import time
from typing import Any

import httpx
import orjson
import psutil
import websockets
from websockets.exceptions import InvalidStatus

from service.server.admission import default_max_connections

from .rawhttp import metric, report
from .utils import TIMEOUT, Client, Replica, publish, running, token


class Refused:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.error = orjson.loads(body)["error"]


async def refused_handshake(r: Replica, user: str, **kwargs: Any) -> Refused | None:
    """The HTTP answer to a handshake that was refused, None if it was accepted (and is closed again)."""
    try:
        ws = await websockets.connect(f"{r.ws_url}?token={token(user)}", open_timeout=TIMEOUT, **kwargs)
    except InvalidStatus as exc:
        response = exc.response
        headers = {k.lower(): v for k, v in response.headers.raw_items()}
        return Refused(response.status_code, headers, bytes(response.body or b"null"))
    await ws.close()
    return None


async def test_connection_ceiling_503_open_sockets_keep_working(http):
    """NOTIFY_MAX_CONNECTIONS=4, with a publisher's keep-alive connection and three sockets open:
    the next handshake and the next request get 503 with Retry-After, /healthz and /metrics still
    answer, the publisher and the sockets go on working, the log says once that the ceiling was
    reached, and once two sockets close new ones are accepted again."""
    with running({"NOTIFY_MAX_CONNECTIONS": "4"}) as r:
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=1)) as publisher:
            assert (await publish(publisher, r, "capped-0")).status_code == 202
            clients = [await Client.connect(r, f"capped-{i}") for i in range(3)]
            for c in clients:
                await c.welcome()
            for _ in range(2):
                refused = await refused_handshake(r, "one-too-many")
                assert refused is not None and refused.status_code == 503
                assert refused.headers["retry-after"] == "1" and refused.error == "over_capacity"
            async with httpx.AsyncClient(timeout=TIMEOUT) as newcomer:
                response = await publish(newcomer, r, "capped-0")
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"] == "over_capacity"
            async with httpx.AsyncClient(timeout=TIMEOUT) as probe:
                assert (await probe.get(r.url + "/healthz")).status_code == 200
            refusals = await metric(http, r, 'notify_connections_refused_total{reason="max_connections"}')
            assert refusals == 3
            for i, c in enumerate(clients):
                sent = await publish(publisher, r, f"capped-{i}", "still-here")
                assert sent.status_code == 202
                [frame] = await c.notifications(1)
                assert frame["id"] == sent.json()["id"]
            for c in clients[:2]:
                await c.close()
            closed = time.monotonic()
            deadline = closed + TIMEOUT
            while (refused := await refused_handshake(r, "welcome-back")) is not None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            assert refused is None, "a place freed by closed sockets is never given again"
            report("ceiling", max_connections=4, refused=refusals, accepted_again_after_s=time.monotonic() - closed)
            await clients[2].close()
        log = r.output()
        assert log.count("connection ceiling reached") == 1, log
        assert "below the connection ceiling again" in log


async def test_per_ip_cap_429_other_addresses_unaffected(http):
    """NOTIFY_MAX_CONNECTIONS_PER_IP=2: a third socket or request from 127.0.0.2 gets 429 with
    Retry-After, while 127.0.0.1 connects as usual; X-Forwarded-For counts only from a peer in
    FORWARDED_ALLOW_IPS (127.0.0.1 by default), and a place freed is taken again."""
    with running({"NOTIFY_MAX_CONNECTIONS_PER_IP": "2"}) as r:
        second = {"local_addr": ("127.0.0.2", 0)}
        held = [await Client.connect(r, f"ip-{i}", **second) for i in range(2)]
        for c in held:
            await c.welcome()
        refused = await refused_handshake(r, "ip-3", **second)
        assert refused is not None and refused.status_code == 429
        assert refused.error == "too_many_connections" and refused.headers["retry-after"] == "1"
        # X-Forwarded-For from a peer that is not trusted changes nothing.
        spoofed = await refused_handshake(r, "ip-3", additional_headers={"X-Forwarded-For": "10.0.0.1"}, **second)
        assert spoofed is not None and spoofed.status_code == 429
        async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address="127.0.0.2")) as from_second:
            assert (await publish(from_second, r, "ip-0")).status_code == 429
            assert (await from_second.get(r.url + "/healthz")).status_code == 200
        assert (await publish(http, r, "ip-0")).status_code == 202  # from 127.0.0.1
        assert await refused_handshake(r, "elsewhere") is None
        # From a trusted proxy (127.0.0.1), each forwarded client is counted on its own.
        proxied = [await Client.connect(r, "p", additional_headers={"X-Forwarded-For": "10.0.0.7"}) for _ in range(2)]
        for c in proxied:
            await c.welcome()
        assert (await refused_handshake(r, "p", additional_headers={"X-Forwarded-For": "10.0.0.7"})).status_code == 429
        assert await refused_handshake(r, "p", additional_headers={"X-Forwarded-For": "10.0.0.8"}) is None
        await held[0].close()
        deadline = time.monotonic() + TIMEOUT
        while (refused := await refused_handshake(r, "ip-again", **second)) is not None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        assert refused is None, "a place freed by a closed socket is never given again"
        assert await metric(http, r, 'notify_connections_refused_total{reason="max_connections_per_ip"}') >= 4
        for c in [held[1], *proxied]:
            await c.close()


async def test_default_ceiling_follows_the_descriptor_limit(http):
    """Unset, NOTIFY_MAX_CONNECTIONS comes from the replica's file-descriptor limit, leaving room
    for Redis, logs and refusals, and /metrics shows it. A replica started with the usual soft limit
    of 1,024 first raises it to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 1024)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))  # inherited by the replica
    try:
        r = Replica().start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        replica_soft, _ = psutil.Process(r.proc.pid).rlimit(psutil.RLIMIT_NOFILE)  # type: ignore[union-attr]
        expected = 1 << 20 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)
        assert replica_soft == expected, (lowered, replica_soft, hard)
        ceiling = await metric(http, r, "notify_max_connections")
        assert ceiling == default_max_connections(replica_soft)
        assert replica_soft - 128 - replica_soft // 10 <= ceiling < replica_soft - 128
        report("default_ceiling", soft_at_start=lowered, fd_limit=replica_soft, max_connections=ceiling)
    finally:
        r.stop()
