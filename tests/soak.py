"""A bounded soak: connects, disconnects and publishes against two real replicas on a real Redis,
then checks that memory, file descriptors, event-loop tasks and Redis subscriptions return to
their starting level. Optionally ends by draining a replica that holds many sockets under load.

Not part of the default test run (a 20-second version is `tests/test_faults.py::test_soak_short`):

    .venv/bin/python -m tests.soak --seconds 180 --sockets 300 --drain-sockets 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import redis
import websockets

from .utils import TIMEOUT, Client, RedisServer, Replica, cluster_env, publish


@dataclass
class Sample:
    rss_mb: float
    fds: int  # other than connections to Redis
    redis_connections: int  # the pools: grow to peak concurrency, bounded by their size
    tasks: int
    connections: int


@dataclass
class SoakResult:
    seconds: float
    connects: int = 0
    abrupt_disconnects: int = 0
    publishes: int = 0
    publish_failures: int = 0
    notifications_received: int = 0
    start: dict[str, Sample] = field(default_factory=dict)
    mid: dict[str, Sample] = field(default_factory=dict)
    end: dict[str, Sample] = field(default_factory=dict)
    channels_start: int = 0
    channels_end: int = 0
    presence_keys_end: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def sample(http: httpx.AsyncClient, replica: Replica) -> Sample:
    assert replica.proc is not None
    proc = psutil.Process(replica.proc.pid)
    values: dict[str, float] = {}
    for line in (await http.get(replica.url + "/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    redis_port = int(replica.env["NOTIFY_REDIS_URL"].rsplit(":", 1)[1].split("/")[0])
    to_redis = sum(1 for c in proc.net_connections("tcp") if c.raddr and c.raddr.port == redis_port)
    return Sample(
        round(proc.memory_info().rss / 1e6, 1),
        proc.num_fds() - to_redis,
        to_redis,
        int(values.get("notify_event_loop_tasks", -1)),
        int(values["notify_connections"]),
    )


async def settle(http: httpx.AsyncClient, replicas: list[Replica], within: float = 10.0) -> dict[str, Sample]:
    """Wait for the replicas to have no sockets, then sample them."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        samples = {r.url: await sample(http, r) for r in replicas}
        if all(s.connections == 0 for s in samples.values()):
            await asyncio.sleep(1.0)  # closing tasks finish
            return {r.url: await sample(http, r) for r in replicas}
        await asyncio.sleep(0.2)
    return {r.url: await sample(http, r) for r in replicas}


async def soak(server: RedisServer, seconds: float = 180, sockets: int = 300, rss_slack_mb: float = 30.0) -> SoakResult:
    env = cluster_env(server)
    prefix = env["NOTIFY_REDIS_PREFIX"]
    replicas = [Replica(env).start(), Replica(env).start()]
    direct = redis.Redis(port=server.port, decode_responses=True)
    result = SoakResult(seconds)
    users = [f"soak{i}" for i in range(max(10, sockets // 2))]
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            # Warm up once (imports, caches, pools), then take the starting level.
            warm = [await Client.connect(replicas[i % 2], users[i]) for i in range(10)]
            for c in warm:
                await c.welcome()
            await publish(http, replicas[0], None, "warm")
            await asyncio.gather(*(c.close() for c in warm))
            result.start = await settle(http, replicas)
            result.channels_start = len(direct.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}:*"))

            last_ids: dict[str, str] = {}
            stop_at = 0.0

            async def churn(worker: int) -> None:
                rng = random.Random(worker)
                while time.monotonic() < stop_at:
                    user = rng.choice(users)
                    replica = rng.choice(replicas)
                    query = f"since={last_ids[user]}" if user in last_ids and rng.random() < 0.3 else ""
                    try:
                        client = await Client.connect(replica, user, query)
                        result.connects += 1
                        hold = time.monotonic() + rng.uniform(0.2, 3.0)
                        with contextlib.suppress(TimeoutError):
                            while time.monotonic() < hold:
                                frame = await client.recv(max(0.01, hold - time.monotonic()))
                                if frame["type"] == "notification":
                                    result.notifications_received += 1
                                    last_ids[user] = frame["id"]
                        if rng.random() < 0.2:
                            client.ws.transport.abort()  # vanish without a close frame
                            result.abrupt_disconnects += 1
                        else:
                            await client.close()
                    except (OSError, websockets.WebSocketException, TimeoutError):
                        await asyncio.sleep(0.1)

            async def publisher() -> None:
                i = 0
                while time.monotonic() < stop_at:
                    target = None if i % 50 == 0 else random.choice(users)
                    try:
                        response = await publish(http, replicas[i % 2], target, "soak", {"i": i})
                        result.publishes += 1
                        if response.status_code != 202:
                            result.publish_failures += 1
                    except httpx.HTTPError:
                        result.publish_failures += 1
                    i += 1
                    await asyncio.sleep(0.01)

            # Two halves: the first finds the working level, the second shows that it stays there.
            stop_at = time.monotonic() + seconds / 2
            await asyncio.gather(publisher(), *(churn(w) for w in range(sockets)))
            result.mid = await settle(http, replicas)
            stop_at = time.monotonic() + seconds / 2
            await asyncio.gather(publisher(), *(churn(w) for w in range(sockets)))
            result.end = await settle(http, replicas)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                result.channels_end = len(direct.execute_command("PUBSUB", "SHARDCHANNELS", f"{prefix}:*"))
                result.presence_keys_end = len(list(direct.scan_iter(f"{prefix}:*:m:*", count=1000)))
                if result.channels_end <= result.channels_start and not result.presence_keys_end:
                    break
                await asyncio.sleep(0.2)
    finally:
        direct.close()
        for r in replicas:
            r.stop()
    _judge(result, rss_slack_mb)
    return result


def _judge(result: SoakResult, rss_slack_mb: float) -> None:
    for url, start in result.start.items():
        mid, end = result.mid[url], result.end[url]
        if end.connections:
            result.problems.append(f"{url}: {end.connections} sockets still registered")
        if end.fds > start.fds + 2:
            result.problems.append(f"{url}: file descriptors {start.fds} -> {end.fds}")
        if end.redis_connections > 64 + 2:
            result.problems.append(f"{url}: {end.redis_connections} connections to Redis, over the pool's size")
        if start.tasks >= 0 and end.tasks > start.tasks + 2:
            result.problems.append(f"{url}: event-loop tasks {start.tasks} -> {end.tasks}")
        # The allocator keeps what it once used: the first half sets the level, the second must not add to it.
        if end.rss_mb > start.rss_mb + rss_slack_mb or end.rss_mb > mid.rss_mb + rss_slack_mb / 3:
            result.problems.append(f"{url}: RSS {start.rss_mb} -> {mid.rss_mb} -> {end.rss_mb} MB")
    if result.channels_end > result.channels_start:
        result.problems.append(f"Redis channels {result.channels_start} -> {result.channels_end}")
    if result.presence_keys_end:
        result.problems.append(f"{result.presence_keys_end} presence keys left in Redis")
    if result.publish_failures:
        result.problems.append(f"{result.publish_failures} publishes failed")
    if result.connects < 10:
        result.problems.append("the soak barely ran")


async def drain_under_load(server: RedisServer, sockets: int = 1000, drain: float = 10.0) -> dict[str, Any]:
    """SIGTERM a replica holding `sockets` sockets while publishes flow to both replicas."""
    env = cluster_env(server, NOTIFY_DRAIN_SECONDS=str(drain))
    a, b = Replica(env).start(), Replica(env).start()
    figures: dict[str, Any] = {"sockets": sockets, "drain_s": drain}
    try:
        clients: list[Client] = []
        for start in range(0, sockets, 100):
            wave = range(start, min(sockets, start + 100))
            batch = await asyncio.gather(*(Client.connect(a, f"dr{i}") for i in wave))
            for c in batch:
                await c.welcome()
            clients += batch
        closes: list[tuple[float, int | None]] = []
        t0: list[float] = []
        outcomes: dict[str, int] = {}

        async def watch(c: Client) -> None:
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                async with asyncio.timeout(drain + 20):
                    while True:
                        await c.ws.recv()
            closes.append((time.monotonic() - t0[0], c.ws.close_code))

        stop = asyncio.Event()

        async def load(replica: Replica, tag: str) -> None:
            async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as http:
                i = 0
                while not stop.is_set():
                    try:
                        response = await publish(http, replica, f"dr{i % sockets}", "load", i)
                        key = f"{tag}:{response.status_code}"
                    except httpx.ConnectError:
                        key = f"{tag}:refused"
                        await asyncio.sleep(0.05)
                    except httpx.HTTPError as exc:
                        key = f"{tag}:error:{type(exc).__name__}"
                    outcomes[key] = outcomes.get(key, 0) + 1
                    i += 1

        watchers = [asyncio.create_task(watch(c)) for c in clients]
        loads = [asyncio.create_task(load(r, tag)) for r, tag in ((a, "draining"), (b, "other")) for _ in range(4)]
        await asyncio.sleep(1.0)
        assert a.proc is not None
        t0.append(time.monotonic())
        a.signal(signal.SIGTERM)
        code = await asyncio.to_thread(a.proc.wait, drain + 15)
        figures["exit_s"] = round(time.monotonic() - t0[0], 2)
        figures["exit_code"] = code
        stop.set()
        await asyncio.gather(*loads)
        await asyncio.gather(*watchers)
        times = sorted(t for t, _ in closes)
        figures["close_codes"] = sorted({c for _, c in closes}, key=str)
        figures["first_close_s"] = round(times[0], 2)
        figures["last_close_s"] = round(times[-1], 2)
        figures["closes_per_second"] = [sum(1 for t in times if s <= t < s + 1) for s in range(int(drain) + 1)]
        figures["publishes"] = outcomes
    finally:
        a.stop()
        b.stop()
    return figures


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--sockets", type=int, default=300)
    parser.add_argument("--drain-sockets", type=int, default=0, help="then drain a replica holding this many")
    ns = parser.parse_args(argv)
    server = RedisServer()
    server.start()
    try:
        result = await soak(server, ns.seconds, ns.sockets)
        print(
            f"soak {ns.seconds:g}s, {ns.sockets} concurrent sockets: connects={result.connects} "
            f"abrupt={result.abrupt_disconnects} publishes={result.publishes} failures={result.publish_failures} "
            f"received={result.notifications_received}"
        )
        for url, start in result.start.items():
            print(f"  {url}:\n    start {start}\n    mid   {result.mid[url]}\n    end   {result.end[url]}")
        print(
            f"  Redis channels {result.channels_start} -> {result.channels_end}, "
            f"presence keys left {result.presence_keys_end}"
        )
        print("  OK" if result.ok else f"  PROBLEMS: {result.problems}")
        ok = result.ok
        if ns.drain_sockets:
            figures = await drain_under_load(server, ns.drain_sockets)
            print(f"drain: {figures}")
            ok = ok and figures["exit_code"] == 0 and figures["close_codes"] == [1012]
        return 0 if ok else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
