"""Two abuses at full size, each against two replicas and a Redis of their own, with the defaults.

presence: a topic of 5,000 members (one socket each, over both replicas); 80 of them ask for the
  member list every 250 ms while 20 other users read their inbox every 100 ms on the same replica.
  Reported: how each ask and each inbox read was answered, and what the asks cost Redis.
memory: 200 sockets of 10 users (20 each, 10 on each replica) publish ~3 KB messages as fast as
  the inbound frame rate lets them, 100 to a topic and then on to a new one, for 20 s. Reported:
  how Redis's memory grew, and how the publishes were answered.

    python -m tests.load.abuse_budgets [--only presence,memory] [--json FILE]

Bounded: each phase has a deadline, every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import redis
import websockets

from tests.utils import RedisServer, Replica, cluster_env, started, token

CHAT = {"chat": {"join": "any", "publish": True, "presence": True}}
_CONNECT_TIMEOUT = 30.0


@contextlib.contextmanager
def deployment(**env: str) -> Iterator[tuple[RedisServer, tuple[Replica, ...]]]:
    server = RedisServer()
    server.start()
    try:
        shared = cluster_env(server, NOTIFY_TOPICS=json.dumps(CHAT), **env)
        with started(Replica(shared), Replica(shared)) as replicas:
            yield server, replicas
    finally:
        server.stop()


def redis_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=10, decode_responses=True)


async def open_socket(replica: Replica, user: str, gate: asyncio.Semaphore) -> Any:
    async with gate, asyncio.timeout(_CONNECT_TIMEOUT):
        while True:
            try:
                ws = await websockets.connect(f"{replica.ws_url}?token={token(user)}", compression=None)
            except websockets.InvalidStatus as exc:  # 429 from the handshake pacing: come back
                if exc.response.status_code != 429:
                    raise
                await asyncio.sleep(0.5)
                continue
            await ws.recv()  # welcome
            return ws


async def next_of(ws: Any, kinds: set[str], timeout: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            frame = orjson.loads(await ws.recv())
            if frame["type"] in kinds:
                return frame


def percentile(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100)[q - 1] * 1000, 1) if len(values) > 1 else 0.0


async def presence(members: int, askers: int, readers: int, seconds: float) -> dict[str, Any]:
    with deployment() as (server, (a, b)):
        topic, gate = f"chat:crowd-{uuid.uuid4().hex[:6]}", asyncio.Semaphore(100)
        started_at = time.monotonic()
        sockets = await asyncio.gather(*(open_socket(b if i % 2 else a, f"m{i}", gate) for i in range(members)))
        for chunk in range(0, members, 500):
            part = sockets[chunk : chunk + 500]
            await asyncio.gather(*(ws.send(orjson.dumps({"type": "join", "topic": topic}).decode()) for ws in part))
            await asyncio.gather(*(next_of(ws, {"joined", "error"}) for ws in part))
        setup = time.monotonic() - started_at
        stats_before = redis_client(server).info("commandstats")
        answers: collections.Counter[str] = collections.Counter()
        counts: collections.Counter[str] = collections.Counter()  # (count, names listed) of each list
        inbox: collections.Counter[int] = collections.Counter()
        inbox_latency: list[float] = []
        ask_latency: list[float] = []
        deadline = time.monotonic() + seconds

        async def ask(ws: Any) -> None:
            # Askers are on replica a (even indexes): the same replica as the inbox readers.
            while time.monotonic() < deadline:
                sent = time.monotonic()
                await ws.send(orjson.dumps({"type": "presence", "topic": topic}).decode())
                frame = await next_of(ws, {"members", "error"})
                ask_latency.append(time.monotonic() - sent)
                answers["members" if frame["type"] == "members" else frame["code"]] += 1
                if frame["type"] == "members":
                    counts[f"{frame['count']} counted, {len(frame['users'])} listed"] += 1
                await asyncio.sleep(max(0.0, 0.25 - (time.monotonic() - sent)))

        async def read(http: httpx.AsyncClient, user: str) -> None:
            headers = {"Authorization": f"Bearer {token(user)}"}
            while time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    status = (await http.get(f"{a.url}/me/notifications", headers=headers)).status_code
                except httpx.HTTPError:
                    status = 0
                inbox_latency.append(time.monotonic() - sent)
                inbox[status] += 1
                await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - sent)))

        async with httpx.AsyncClient(timeout=10) as http:
            await asyncio.gather(
                *(ask(ws) for ws in sockets[0 : 2 * askers : 2]), *(read(http, f"reader{i}") for i in range(readers))
            )
        stats = redis_client(server).info("commandstats")
        cost = {
            name: {
                "calls": stats.get(f"cmdstat_{name}", {}).get("calls", 0)
                - stats_before.get(f"cmdstat_{name}", {}).get("calls", 0),
                "usec": stats.get(f"cmdstat_{name}", {}).get("usec", 0)
                - stats_before.get(f"cmdstat_{name}", {}).get("usec", 0),
            }
            for name in ("hkeys", "hscan", "hlen")
        }
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {
        "members": members,
        "askers": askers,
        "seconds": seconds,
        "setup_seconds": round(setup, 1),
        "asks": sum(answers.values()),
        "ask_answers": dict(answers),
        "member_lists": dict(counts),
        "ask_p50_ms": percentile(ask_latency, 50),
        "ask_p99_ms": percentile(ask_latency, 99),
        "inbox_reads": sum(inbox.values()),
        "inbox_statuses": {str(k): v for k, v in inbox.items()},
        "inbox_p50_ms": percentile(inbox_latency, 50),
        "inbox_p99_ms": percentile(inbox_latency, 99),
        "redis_member_commands": cost,
    }


async def memory(sockets: int, users: int, seconds: float) -> dict[str, Any]:
    with deployment() as (server, replicas):
        client = redis_client(server)
        baseline = int(client.info("memory")["used_memory"])
        gate = asyncio.Semaphore(100)
        conns = await asyncio.gather(
            *(open_socket(replicas[(i // users) % 2], f"user{i % users}", gate) for i in range(sockets))
        )
        answers: collections.Counter[str] = collections.Counter()
        closes: collections.Counter[str] = collections.Counter()
        data = "x" * 3000
        deadline = time.monotonic() + seconds

        async def drain(ws: Any) -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for text in ws:
                    frame = orjson.loads(text)
                    if frame["type"] == "published":
                        answers["published"] += 1
                    elif frame["type"] == "error":
                        answers[frame["code"]] += 1

        async def spam(index: int, ws: Any) -> None:
            reader = asyncio.create_task(drain(ws))
            topic, sent, pace = 0, 0, 1 / 18  # under the 20 frames a second a socket may send
            try:
                while time.monotonic() < deadline:
                    name = f"chat:s{index}-{topic}"
                    frames = [{"type": "join", "topic": name}]
                    frames += [{"type": "publish", "topic": name, "event": "m", "data": data}] * 100
                    frames += [{"type": "leave", "topic": name}]
                    for frame in frames:
                        if time.monotonic() >= deadline:
                            break
                        await ws.send(orjson.dumps(frame).decode())
                        sent += 1
                        await asyncio.sleep(pace)
                    topic += 1
            except websockets.ConnectionClosed as exc:
                closes[str(exc.rcvd.code if exc.rcvd else None)] += 1
            await asyncio.sleep(1.0)  # the last answers
            reader.cancel()

        samples: list[tuple[float, int]] = []

        async def sample() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline + 1.5:
                used = int(await asyncio.to_thread(lambda: client.info("memory")["used_memory"]))
                samples.append((round(time.monotonic() - start, 1), used))
                await asyncio.sleep(1.0)

        await asyncio.gather(sample(), *(spam(i, ws) for i, ws in enumerate(conns)))
        final = int(client.info("memory")["used_memory"])
        keys = int(client.dbsize())
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
        client.close()
    mb = 1024 * 1024
    return {
        "sockets": sockets,
        "users": users,
        "seconds": seconds,
        "redis_used_mb_before": round(baseline / mb, 1),
        "redis_used_mb_after": round(final / mb, 1),
        "redis_growth_mb_per_second": [round((used - baseline) / mb, 1) for _, used in samples],
        "redis_keys": keys,
        "answers": dict(answers),
        "closes": dict(closes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="presence,memory", help="comma-separated: presence, memory")
    parser.add_argument("--members", type=int, default=5000)
    parser.add_argument("--askers", type=int, default=80)
    parser.add_argument("--readers", type=int, default=20)
    parser.add_argument("--ask-seconds", type=float, default=10.0)
    parser.add_argument("--sockets", type=int, default=200)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    phases = {part.strip() for part in args.only.split(",")}
    report: dict[str, Any] = {}
    if "presence" in phases:
        report["presence"] = asyncio.run(presence(args.members, args.askers, args.readers, args.ask_seconds))
        print(json.dumps({"presence": report["presence"]}, indent=1), flush=True)
    if "memory" in phases:
        report["memory"] = asyncio.run(memory(args.sockets, args.users, args.seconds))
        print(json.dumps({"memory": report["memory"]}, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
