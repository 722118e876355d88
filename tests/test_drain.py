"""Graceful drain on SIGTERM, and a replica killed outright.

On SIGTERM a replica turns unready at once, refuses new sockets, closes open ones with 1012
spread over NOTIFY_DRAIN_SECONDS, finishes in-flight publishes (202 or 503, never a reset) and
exits 0 in time, even with a client that never reads and a Redis that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import httpx
import pytest
import redis
import websockets

from .test_faults import connect_many, metrics, report
from .test_limits import RawSocket
from .utils import TIMEOUT, Client, Replica, cluster_env, publish


async def watch_close(client: Client, t0: list[float], closes: list[tuple[float, int | None]]) -> None:
    """Read until the server closes; record when (relative to SIGTERM) and with which code."""
    with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
        async with asyncio.timeout(60):
            while True:
                await client.ws.recv()
    closes.append((time.monotonic() - t0[0] if t0 else -1.0, client.ws.close_code))


class Publisher:
    """Publishes to one replica on a fresh connection per request (so no keep-alive race hides a
    reset) and classifies every outcome."""

    def __init__(self, replica: Replica, users: list[str]) -> None:
        self.replica = replica
        self.users = users
        self.outcomes: dict[str, int] = {}
        self.stop = asyncio.Event()
        self.errors_at: list[float] = []

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def run(self, concurrency: int = 4) -> None:
        async def worker(w: int) -> None:
            i = w
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=10, limits=limits) as http:
                while not self.stop.is_set() and i < 100_000:
                    try:
                        response = await publish(http, self.replica, self.users[i % len(self.users)], "load", i)
                        self.count(str(response.status_code))
                    except httpx.ConnectError:
                        self.count("refused")  # not in flight: the replica no longer listens
                        await asyncio.sleep(0.05)
                    except httpx.HTTPError as exc:
                        self.count(f"error:{type(exc).__name__}")
                        self.errors_at.append(time.monotonic())
                    i += concurrency
                    await asyncio.sleep(0.01)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


@pytest.mark.slow
async def test_sigterm_drains_300_sockets_under_load(own_redis):
    """SIGTERM a replica holding 300 sockets (and one that never reads) while publishes flow to
    both replicas: /readyz 503 at once, new sockets refused with 503, every socket closed with
    1012 spread over the drain, every publish to it answered 202 or 503, the other replica
    keeps serving, exit 0 within drain + a few seconds."""
    drain = 4.0
    env = cluster_env(own_redis, NOTIFY_DRAIN_SECONDS=str(drain))
    a, b = Replica(env).start(), Replica(env).start()
    try:
        users_a = [f"d{i}" for i in range(300)]
        clients = await connect_many(a, users_a)
        on_b = await connect_many(b, [f"e{i}" for i in range(20)])
        stuck = RawSocket(a, "never-reads", rcvbuf=4096)
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(20):  # fill the non-reader's buffers so that nothing more fits
                assert (await publish(http, a, "never-reads", "fill", "z" * 30_000)).status_code == 202
            t0: list[float] = []
            closes: list[tuple[float, int | None]] = []
            watchers = [asyncio.create_task(watch_close(c, t0, closes)) for c in clients]
            load_a, load_b = Publisher(a, users_a), Publisher(b, [f"e{i}" for i in range(20)])
            loads = [asyncio.create_task(load_a.run()), asyncio.create_task(load_b.run())]
            await asyncio.sleep(1.0)

            assert a.proc is not None
            t0.append(time.monotonic())
            a.signal(signal.SIGTERM)
            ready = await http.get(a.url + "/readyz")
            unready_s = time.monotonic() - t0[0]
            assert ready.status_code == 503 and ready.json()["status"] == "draining"
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(f"{a.ws_url}?token=x", open_timeout=TIMEOUT)
            assert refused.value.response.status_code == 503

            # The other replica serves all along: its sockets get what is published there.
            response = await publish(http, b, "e0", "during-drain")
            assert response.status_code == 202
            frames = await on_b[0].notifications(20, TIMEOUT * 2)
            assert response.json()["id"] in [f["id"] for f in frames] or frames

            exit_code = await asyncio.to_thread(a.proc.wait, drain + 10)
            exit_s = time.monotonic() - t0[0]
            load_a.stop.set()
            load_b.stop.set()
            await asyncio.gather(*loads)
            await asyncio.gather(*watchers)
        stuck.close()

        assert exit_code == 0, a.output()
        assert exit_s < drain + 5, exit_s
        codes = {code for _, code in closes}
        assert codes == {1012}, codes
        times = sorted(t for t, _ in closes)
        # Spread: nobody is closed in a burst; the closes cover the drain time evenly.
        assert times[0] < drain * 0.1 and times[-1] > drain * 0.8 and times[-1] < drain + 1.0, (times[0], times[-1])
        per_second = [sum(1 for t in times if s <= t < s + 1) for s in range(int(drain) + 1)]
        assert max(per_second) <= len(times) / drain * 1.5, per_second
        bad_a = {k: v for k, v in load_a.outcomes.items() if k not in ("202", "503", "refused")}
        assert not bad_a, (load_a.outcomes, [t - t0[0] for t in load_a.errors_at])
        assert set(load_b.outcomes) == {"202"}, load_b.outcomes
        report(
            "drain",
            sockets=len(clients),
            drain_s=drain,
            unready_after_s=unready_s,
            first_close_s=times[0],
            last_close_s=times[-1],
            closes_per_second=str(per_second),
            exit_s=exit_s,
            exit_code=exit_code,
            publishes_to_draining=str(load_a.outcomes),
            publishes_to_other=str(load_b.outcomes),
        )
        await asyncio.gather(*(c.close() for c in on_b))
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
async def test_sigterm_with_hung_redis_and_a_non_reader(own_redis):
    """Redis hangs (SIGSTOP) and a client never reads: publishes in flight at SIGTERM answer 503
    (never a reset), and the replica still exits 0 within drain + a few seconds."""
    drain = 2.0
    env = cluster_env(own_redis, NOTIFY_DRAIN_SECONDS=str(drain))
    a = Replica(env).start()
    try:
        clients = await connect_many(a, [f"q{i}" for i in range(50)])
        stuck = RawSocket(a, "never-reads-2", rcvbuf=4096)
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(20):
                assert (await publish(http, a, "never-reads-2", "fill", "z" * 30_000)).status_code == 202
            own_redis.pause()
            try:
                in_flight = [asyncio.create_task(publish(http, a, f"q{i}", "in-flight")) for i in range(10)]
                await asyncio.sleep(0.3)
                t0 = time.monotonic()
                a.signal(signal.SIGTERM)
                results = await asyncio.gather(*in_flight, return_exceptions=True)
                assert a.proc is not None
                exit_code = await asyncio.to_thread(a.proc.wait, drain + 10)
                exit_s = time.monotonic() - t0
            finally:
                own_redis.resume()
        stuck.close()
        statuses = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in results]
        assert set(statuses) == {503}, statuses
        assert exit_code == 0, a.output()
        assert exit_s < drain + 6, exit_s
        report("drain_hung_redis", drain_s=drain, exit_s=exit_s, exit_code=exit_code, in_flight=str(statuses))
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    finally:
        a.stop()


@pytest.mark.slow
async def test_killed_replica_leaves_nothing_that_matters(own_redis):
    """SIGKILL a replica: its subscriptions vanish with its connections, the survivor stays ready
    and delivers, and the online count stops including the dead replica once the others reap it."""
    env = cluster_env(own_redis, NOTIFY_PROBE_TIMEOUT_SECONDS="1.5", NOTIFY_PRESENCE_DEAD_AFTER_SECONDS="4")
    prefix = env["NOTIFY_REDIS_PREFIX"]

    def subscribers(user: str) -> int:
        return int(direct.execute_command("PUBSUB", "SHARDNUMSUB", f"{prefix}:{{u:{user}}}:c")[1])

    a, b = Replica(env).start(), Replica(env).start()
    direct = redis.Redis(port=own_redis.port, decode_responses=True)
    try:
        doomed = await connect_many(a, ["shared", "shared", "only-a"])
        survivors = await connect_many(b, ["shared"])
        async with httpx.AsyncClient(timeout=10) as http:
            first = await publish(http, b, "shared", "before")
            assert first.json()["online"] == 3
            assert subscribers("only-a") == 1
            assert a.proc is not None
            a.proc.kill()
            a.proc.wait(TIMEOUT)
            killed_at = time.monotonic()
            while subscribers("only-a") and time.monotonic() - killed_at < TIMEOUT:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            assert subscribers("only-a") == 0
            assert subscribers("shared") == 1  # the survivor's
            online: Any = None
            while time.monotonic() - killed_at < 4 + 2 + TIMEOUT:
                response = await publish(http, b, "shared", "after")
                assert response.status_code == 202
                online = response.json()["online"]
                if online == 1:
                    break
                await asyncio.sleep(0.25)
            forgotten_s = time.monotonic() - killed_at
            assert online == 1
            assert (await http.get(b.url + "/readyz")).status_code == 200
            got = await survivors[0].notifications(2)
            assert got[0]["id"] == first.json()["id"]
            assert (await metrics(http, b))["notify_connections"] == 1
            report("replica_killed", presence_forgotten_s=forgotten_s)
        await asyncio.gather(*(c.close() for c in survivors))
        for c in doomed:
            with contextlib.suppress(Exception):
                await c.close()
    finally:
        direct.close()
        a.stop()
        b.stop()
