"""Presence storms, measured: two replicas on one Redis, everything on 127.0.0.1.

    python -m tests.load.presence_storm [--scenario close|join_leave|both] [--accounts 5]
        [--sockets-per-account 200] [--topics 64] [--members 5000] [--rate 50] [--leavers 1000]
        [--limit 500] [--deadline 300] [--json FILE]
    make presence-storm

`close`: `--accounts` users each hold `--sockets-per-account` sockets (half on each replica), each
socket in `--topics` topics of its own; then every socket closes at once. Measured: `/readyz`
answers other than 200 on either replica, subscription rebuilds (`notify_broker_reconnects`), a
bystander's delivery latency (a notification to a user on each replica every 0.1 s), and the time
until every leave is swept (Redis's set of due topics empty).

`join_leave`: `--members` users join one `join_leave` room at `--rate` a second, spread over both
replicas, then `--leavers` of them close at once. Measured: join latency (the `join` frame to its
`joined`), `presence` frames an early member received, subscription rebuilds, `/readyz` failures,
the member count after each wave (and how long until it is exact) and the bystander's latency
during the leaves.

Every wait is bounded by `--deadline`; the processes started here are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import websockets

from tests.utils import RedisServer, Replica, cluster_env, publisher_headers, token

_READY_EVERY = 0.2
_BYSTANDER_EVERY = 0.1


@dataclass
class Figures:
    """What one scenario measured."""

    scenario: str
    values: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: Any) -> None:
        self.values[name] = value
        print(f"  {name}: {value}", flush=True)


def percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


class Socket:
    """One client socket: answers to joins by topic, presence frames counted, latencies noted."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.presence = 0
        self.latencies: list[tuple[float, float]] = []  # (arrival, latency) of bystander notifications
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, replica: Replica, user: str) -> Socket:
        ws = await websockets.connect(
            f"{replica.ws_url}?token={token(user)}", open_timeout=60, max_queue=None, ping_interval=None
        )
        return cls(ws)

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for raw in self.ws:
                frame = orjson.loads(raw)
                kind = frame["type"]
                if kind in ("joined", "error") and frame.get("topic") in self.waiting:
                    self.waiting.pop(frame["topic"]).set_result(frame)
                elif kind == "presence":
                    self.presence += 1
                elif kind == "notification" and isinstance(frame.get("data"), dict) and "sent" in frame["data"]:
                    now = time.time()
                    self.latencies.append((now, now - frame["data"]["sent"]))

    async def join(self, topic: str) -> dict[str, Any]:
        answer = self.waiting[topic] = asyncio.get_running_loop().create_future()
        await self.ws.send(orjson.dumps({"type": "join", "topic": topic}).decode())
        return await answer

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()


class Watch:
    """Readiness of each replica, and a bystander's notifications, for as long as it runs."""

    def __init__(self, replicas: list[Replica], http: httpx.AsyncClient) -> None:
        self.replicas = replicas
        self.http = http
        self.unready: list[tuple[float, int, int]] = []  # (time, replica, status)
        self.bystanders: list[Socket] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for n, replica in enumerate(self.replicas):
            self.bystanders.append(await Socket.open(replica, f"bystander-{n}"))
        self._tasks = [asyncio.create_task(self._readiness()), asyncio.create_task(self._publish())]

    async def _readiness(self) -> None:
        while True:
            for n, replica in enumerate(self.replicas):
                try:
                    status = (await self.http.get(f"{replica.url}/readyz", timeout=2)).status_code
                except httpx.HTTPError:
                    status = 0
                if status != 200:
                    self.unready.append((time.monotonic(), n, status))
            await asyncio.sleep(_READY_EVERY)

    async def _publish(self) -> None:
        headers = publisher_headers()
        while True:
            for n, replica in enumerate(self.replicas):
                body = {"event": "tick", "data": {"sent": time.time()}}
                with contextlib.suppress(httpx.HTTPError):
                    await self.http.post(f"{replica.url}/notify/bystander-{1 - n}", json=body, headers=headers)
            await asyncio.sleep(_BYSTANDER_EVERY)

    def latencies(self, since: float) -> list[float]:
        return [latency for socket in self.bystanders for at, latency in socket.latencies if at >= since]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for socket in self.bystanders:
            await socket.close()


async def metric(http: httpx.AsyncClient, replica: Replica, name: str) -> float | None:
    try:
        text = (await http.get(f"{replica.url}/metrics", timeout=60)).text
    except httpx.HTTPError:
        return None  # the replica did not answer within a minute: reported as unknown
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def rebuilds(http: httpx.AsyncClient, replicas: list[Replica]) -> float | None:
    counts = [await metric(http, replica, "notify_broker_reconnects_total") for replica in replicas]
    return None if None in counts else sum(c for c in counts if c is not None)


def delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


async def bounded(seconds: float, awaitable: Any) -> Any:
    async with asyncio.timeout(seconds):
        return await awaitable


async def scenario_close(args: argparse.Namespace, redis: RedisServer, figures: Figures) -> None:
    env = cluster_env(
        redis,
        NOTIFY_TOPICS=json.dumps({"room": {"join": "any", "presence": True}}),
        NOTIFY_MAX_CONNECTIONS_PER_USER=str(args.sockets_per_account),
        NOTIFY_MAX_INBOUND_RATE="1000",
        NOTIFY_LOG_LEVEL="error",
    )
    run = uuid.uuid4().hex[:6]
    replicas = [Replica(env).start(), Replica(env).start()]
    sockets: list[Socket] = []
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            started = time.monotonic()
            for n in range(args.accounts * args.sockets_per_account):
                sockets.append(await Socket.open(replicas[n % 2], f"{run}-account-{n % args.accounts}"))

            async def fill(index: int, socket: Socket) -> None:
                for t in range(args.topics):
                    answer = await socket.join(f"room:{run}-{index}-{t}")
                    assert answer["type"] == "joined", answer

            await bounded(args.deadline, asyncio.gather(*(fill(n, s) for n, s in enumerate(sockets))))
            figures.add("memberships", len(sockets) * args.topics)
            figures.add("setup_s", round(time.monotonic() - started, 1))
            await asyncio.sleep(3.0)  # the joins' background writes settle
            watch = Watch(replicas, http)
            await watch.start()
            await asyncio.sleep(2.0)
            before = await rebuilds(http, replicas)
            closed_at = time.monotonic()
            await asyncio.gather(*(socket.close() for socket in sockets))
            due = f"{env['NOTIFY_REDIS_PREFIX']}:leaving"
            swept_s = None
            while time.monotonic() - closed_at < args.deadline:
                await asyncio.sleep(0.2)
                if int(redis.command("ZCARD", due)) == 0 and time.monotonic() - closed_at > 1.0:
                    swept_s = round(time.monotonic() - closed_at, 1)
                    break
            await asyncio.sleep(2.0)
            figures.add("all_leaves_swept_s", swept_s)
            figures.add("readyz_503", sum(1 for _, _, status in watch.unready if status == 503))
            figures.add("readyz_no_answer_in_2s", sum(1 for _, _, status in watch.unready if status == 0))
            figures.add("subscription_rebuilds", delta(await rebuilds(http, replicas), before))
            during = watch.latencies(closed_at)
            figures.add("bystander_p99_s", percentile(during, 0.99))
            figures.add("bystander_max_s", percentile(during, 1.0))
            await watch.stop()
    finally:
        for socket in sockets:
            socket.reader.cancel()
        for replica in replicas:
            replica.stop()


async def scenario_join_leave(args: argparse.Namespace, redis: RedisServer, figures: Figures) -> None:
    env = cluster_env(
        redis,
        NOTIFY_TOPICS=json.dumps({"chat": {"join": "any", "presence": True, "join_leave": True}}),
        NOTIFY_JOIN_LEAVE_MAX_MEMBERS=str(args.limit),
        NOTIFY_LOG_LEVEL="error",
    )
    topic = f"chat:{uuid.uuid4().hex[:8]}"
    replicas = [Replica(env).start(), Replica(env).start()]
    members: list[Socket] = []
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            watch = Watch(replicas, http)
            await watch.start()
            before = await rebuilds(http, replicas)
            latencies: list[float] = []
            refused: dict[str, int] = {}
            inside: set[Socket] = set()

            async def enter(n: int) -> None:
                socket = await Socket.open(replicas[n % 2], f"member-{n}")
                members.append(socket)
                sent = time.monotonic()
                answer = await socket.join(topic)
                latencies.append(time.monotonic() - sent)
                if answer["type"] == "joined":
                    inside.add(socket)
                else:
                    refused[answer["code"]] = refused.get(answer["code"], 0) + 1

            started = time.monotonic()
            entering = []
            for n in range(args.members):
                entering.append(asyncio.create_task(enter(n)))
                await asyncio.sleep(max(0.0, started + (n + 1) / args.rate - time.monotonic()))
            await bounded(args.deadline, asyncio.gather(*entering))
            figures.add("members", len(inside))
            figures.add("joins_refused", refused)
            figures.add("join_p50_s", percentile(latencies, 0.5))
            figures.add("join_p99_s", percentile(latencies, 0.99))
            last_tenth = latencies[-max(1, len(latencies) // 10) :]
            figures.add("join_last_tenth_p50_s", percentile(last_tenth, 0.5))
            exact_s = await until_count(http, replicas, topic, len(inside), args.deadline)
            figures.add("count_exact_after_joins_s", exact_s)
            figures.add("count_after_joins", await count(http, replicas[0], topic))
            await asyncio.sleep(3.0)  # the last announcements arrive
            figures.add("presence_frames_to_first_member", members[0].presence if members else None)

            left_at = time.monotonic()
            leaving = members[: args.leavers]
            await asyncio.gather(*(socket.close() for socket in leaving))
            remaining = len(inside - set(leaving))
            exact_s = await until_count(http, replicas, topic, remaining, args.deadline)
            figures.add("count_exact_after_leaves_s", exact_s)
            figures.add("count_after_leaves", await count(http, replicas[1], topic))
            during = watch.latencies(left_at)
            figures.add("bystander_p99_during_leaves_s", percentile(during, 0.99))
            figures.add("bystander_max_during_leaves_s", percentile(during, 1.0))
            figures.add("readyz_503", sum(1 for _, _, status in watch.unready if status == 503))
            figures.add("readyz_no_answer_in_2s", sum(1 for _, _, status in watch.unready if status == 0))
            figures.add("subscription_rebuilds", delta(await rebuilds(http, replicas), before))
            await watch.stop()
    finally:
        for socket in members:
            await socket.close()
        for replica in replicas:
            replica.stop()


async def count(http: httpx.AsyncClient, replica: Replica, topic: str) -> int | None:
    try:
        response = await http.get(f"{replica.url}/topics/{topic}/presence", headers=publisher_headers())
        return int(response.json()["count"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


async def until_count(
    http: httpx.AsyncClient, replicas: list[Replica], topic: str, expected: int, deadline: float
) -> float | None:
    """Seconds until both replicas answer the expected count (None: not within the deadline)."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if all([await count(http, replica, topic) == expected for replica in replicas]):
            return round(time.monotonic() - started, 1)
        await asyncio.sleep(0.25)
    return None


async def run(args: argparse.Namespace) -> list[Figures]:
    results = []
    for name in ("close", "join_leave") if args.scenario == "both" else (args.scenario,):
        redis = RedisServer()
        redis.start()
        figures = Figures(name)
        print(f"{name}:", flush=True)
        try:
            await (scenario_close if name == "close" else scenario_join_leave)(args, redis, figures)
        except TimeoutError:
            figures.add("error", f"not done within {args.deadline}s")
        finally:
            redis.stop()
        results.append(figures)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=["close", "join_leave", "both"], default="both")
    parser.add_argument("--accounts", type=int, default=5)
    parser.add_argument("--sockets-per-account", type=int, default=200)
    parser.add_argument("--topics", type=int, default=64)
    parser.add_argument("--members", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--leavers", type=int, default=1000)
    parser.add_argument("--limit", type=int, default=500, help="NOTIFY_JOIN_LEAVE_MAX_MEMBERS")
    parser.add_argument("--deadline", type=float, default=300.0, help="the longest any one wait may take")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"scenario": r.scenario, **r.values} for r in results], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
