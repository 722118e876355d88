"""The workloads: connect, join, targeted, broadcast, topic, batch; each returns a flat dict of figures."""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Collection
from typing import Any

import orjson

from tests.utils import token

from .clients import Fleet, Publisher, paced, perf
from .procs import CpuWindow, Deployment, rss_bytes


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def client_tokens(sockets: int) -> list[str]:
    """One distinct token per socket (a `jti` each), so every connect is a full verification."""
    return [token(f"u{i >> 1}", ttl=3600, jti=f"{os.getpid()}-{i}-{random.random()}") for i in range(sockets)]


def publisher_token() -> str:
    return token("bench-publisher", "notify:publish", ttl=3600)


def _per(count: float, seconds: float) -> float | None:
    return count / seconds if seconds > 0 else None


async def connect(
    dep: Deployment,
    fleet: Fleet,
    ports: Callable[[int], int],
    concurrency: int,
    timeout: float = 30.0,
    settle: float = 2.0,
) -> dict[str, Any]:
    """Open every socket of the fleet; connects/s, failures, and idle RSS per 1,000 sockets."""
    tokens = client_tokens(len(fleet.listeners))
    await asyncio.sleep(0.5)
    rss0 = dep.rss()
    window = CpuWindow(dep).start()
    seconds, failures = await fleet.connect_all(ports, tokens, concurrency, timeout)
    window.stop()
    await asyncio.sleep(settle / 2)  # idle: presence writes and subscriptions settle, then RSS is read
    idle = CpuWindow(dep).start()  # and what the server spends with nothing to do, which should be ~0
    await asyncio.sleep(settle / 2)
    idle.stop()
    opened = len(fleet.listeners) - failures
    rss1 = dep.rss()
    return {
        "sockets": opened,
        "connect_failures": failures,
        "connect_seconds": seconds,
        "connects_per_s": _per(opened, seconds),
        "connects_per_cpu_s": _per(opened, window.server),
        "connect_server_cpu_s": window.server,
        "connect_redis_cpu_s": window.redis,
        "cpu_us_per_connect": window.server / opened * 1e6 if opened else None,
        "idle_server_cpu_util": idle.server / idle.wall if idle.wall else None,
        "rss_base_mb": rss0 / 2**20,
        "rss_idle_mb": rss1 / 2**20,
        "rss_kb_per_socket": (rss1 - rss0) / 1024 / opened if opened else None,
        "rss_mb_per_1000": (rss1 - rss0) / 2**20 * 1000 / opened if opened else None,
    }


async def join(
    dep: Deployment,
    fleet: Fleet,
    topic: str,
    concurrency: int,
    timeout: float = 30.0,
    only: Collection[int] | None = None,
) -> dict[str, Any]:
    """Every open socket (of `only`) joins `topic` and waits for the answer (`joined`, or a Socket.IO ack),
    with at most `concurrency` joins in flight, as `connect` opens sockets; server CPU per join."""
    window = CpuWindow(dep).start()
    seconds, asked, failures = await fleet.join_all(topic, concurrency, timeout, only)
    window.stop()
    joined = asked - sum(failures.values())
    return {
        "topic": topic,
        "joined": joined,
        "join_failures": sum(failures.values()),
        "join_errors": dict(failures.most_common(5)),
        "join_seconds": seconds,
        "joins_per_s": _per(joined, seconds),
        "joins_per_cpu_s": _per(joined, window.server),
        "join_server_cpu_s": window.server,
        "join_redis_cpu_s": window.redis,
        "cpu_us_per_join": window.server / joined * 1e6 if joined else None,
    }


def _cpu_fields(window: CpuWindow, delivered: int) -> dict[str, Any]:
    return {
        "server_cpu_s": window.server,
        "redis_cpu_s": window.redis,
        "generator_cpu_s": window.generator,
        "wall_s": window.wall,
        "server_cpu_util": window.server / window.wall if window.wall else None,
        "server_kernel_share": window.kernel_share,
        "generator_cpu_util": window.generator / window.wall if window.wall else None,
        "deliveries_per_cpu_s": _per(delivered, window.server),
        "deliveries_per_cpu_s_with_redis": _per(delivered, window.server + window.redis),
    }


async def _wait(condition: Callable[[], bool], timeout: float) -> None:
    deadline = perf() + timeout
    while not condition() and perf() < deadline:
        await asyncio.sleep(0.01)


async def targeted(
    dep: Deployment,
    fleet: Fleet,
    pub: Publisher,
    rate: float,
    duration: float,
    drain: float,
    batch: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """POST /notify/{user} to random users at `rate` per second (or `POST /notify` with `batch` items per
    request, same notification rate); every notification should reach both devices of its user, once.
    `extra`: more fields of each notification (a `fallback`)."""
    users = fleet.users
    count = int(rate * duration)
    rec = fleet.recorder
    run = rec.reset(count, 0)
    rng = random.Random(count)
    for i in range(count):
        rec.user_of[i] = rng.randrange(users)
    accepted = bytearray(count)
    statuses: dict[int, int] = {}

    def single(i: int, t: float) -> None:
        def done(status: int, body: bytes) -> None:
            statuses[status] = statuses.get(status, 0) + 1
            if 200 <= status < 300:
                accepted[i] = 1

        body = orjson.dumps({"event": "bench", "data": {"t": t, "k": i, "r": run}, **(extra or {})})
        pub.request(f"/notify/u{rec.user_of[i]}", body, done)

    def batched(j: int, t: float) -> None:
        first = j * batch
        ks = range(first, min(count, first + batch))

        def done(status: int, body: bytes) -> None:
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                for k, result in zip(ks, orjson.loads(body)["results"], strict=True):
                    if result["status"] == 202:
                        accepted[k] = 1
                    else:
                        statuses[result["status"]] = statuses.get(result["status"], 0) + 1

        items = [{"user": f"u{rec.user_of[k]}", "event": "bench", "data": {"t": t, "k": k, "r": run}} for k in ks]
        pub.request("/notify", orjson.dumps(items), done)

    lost_before = len(pub.lost_after_idle)
    window = CpuWindow(dep).start()
    t0 = perf()
    if batch:
        sent_for = await paced(rate / batch, -(-count // batch), batched, duration + 30)
    else:
        sent_for = await paced(rate, count, single, duration + 30)
    await pub.drained(drain)
    expected = 2 * sum(accepted)
    await _wait(lambda: rec.received >= expected, drain)
    window.stop()
    lost = 0
    for k in range(count):
        if accepted[k]:
            u = rec.user_of[k]
            lost += (k not in rec.seen[2 * u]) + (k not in rec.seen[2 * u + 1])
    lat = [x * 1000 for x in rec.latency]
    ok = sum(accepted)
    http_errors = count - ok  # refused, failed, or unanswered when the drain ran out
    span = (rec.last - t0) if rec.last else 0.0
    result = {
        "rate": rate,
        "batch": batch,
        "duration_s": sent_for,
        "notifications": count,
        "accepted": ok,
        "http_errors": http_errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "unanswered": pub.in_flight,
        # Requests lost with their connection: how long it had sat idle first (the server closes a
        # connection idle for its keep-alive timeout, and a request sent as it does is lost).
        "lost_after_idle_s": [round(s, 3) for s in pub.lost_after_idle[lost_before:]],
        "publish_rate": _per(ok, sent_for),
        "delivered": rec.received,
        "expected": expected,
        "lost": lost,
        "duplicates": rec.duplicates,
        "misrouted": rec.misrouted,
        "stale": rec.stale,
        "delivered_per_s": _per(rec.received, max(span, sent_for)),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "sockets_closed": fleet.closed,
        **_cpu_fields(window, rec.received),
    }
    result["holds"] = bool(
        http_errors == 0
        and lost == 0
        and rec.duplicates == 0
        and (result["publish_rate"] or 0) >= 0.95 * rate
        and (result["p99_ms"] is not None and result["p99_ms"] <= KNEE_P99_MS)
    )
    return result


# A rate "holds" when every notification is accepted and delivered once, the publisher keeps the
# offered rate, and p99 end-to-end stays at or under this.
KNEE_P99_MS = 250.0


async def broadcast(
    dep: Deployment, fleet: Fleet, pub: Publisher, rate: float, duration: float, drain: float
) -> dict[str, Any]:
    """POST /broadcast at `rate`; time until the last socket has each one, and deliveries/s."""
    members = [i for i in range(len(fleet.listeners)) if fleet.is_open(i)]
    return await _fanout(dep, fleet, pub, "/broadcast", members, rate, duration, drain)


async def topic(
    dep: Deployment, fleet: Fleet, pub: Publisher, name: str, rate: float, duration: float, drain: float
) -> dict[str, Any]:
    """POST /topics/{name} at `rate` (a Socket.IO server: `io.to(name).emit`); time until the last member
    socket has each one, and deliveries/s. A socket not in the topic that gets one counts as misrouted."""
    result = await _fanout(dep, fleet, pub, f"/topics/{name}", fleet.members(name), rate, duration, drain)
    return {"topic": name, **result}


async def _fanout(
    dep: Deployment,
    fleet: Fleet,
    pub: Publisher,
    path: str,
    members: list[int],
    rate: float,
    duration: float,
    drain: float,
) -> dict[str, Any]:
    """POST `path` at `rate`, each message due on every socket of `members`; the broadcast and topic runs."""
    count = int(rate * duration)
    rec = fleet.recorder
    mask = bytearray(len(fleet.listeners))
    for i in members:
        mask[i] = 1
    run = rec.reset(0, count, mask)
    sockets = len(members)
    accepted = bytearray(count)
    statuses: dict[int, int] = {}

    def fire(j: int, t: float) -> None:
        def done(status: int, body: bytes) -> None:
            statuses[status] = statuses.get(status, 0) + 1
            if 200 <= status < 300:
                accepted[j] = 1

        pub.request(path, orjson.dumps({"event": "bench", "data": {"t": t, "b": j, "r": run}}), done)

    window = CpuWindow(dep).start()
    t0 = perf()
    sent_for = await paced(rate, count, fire, duration + 30)
    await pub.drained(drain)
    expected = sockets * sum(accepted)
    await _wait(lambda: rec.received >= expected, drain)
    window.stop()
    complete = [rec.b_last[j] * 1000 for j in range(count) if accepted[j] and rec.b_count[j] >= sockets]
    ok_ids = [j for j in range(count) if accepted[j]]
    lost = sum(1 for i in members for j in ok_ids if not rec.b_seen[i][j])  # member by member
    last_arrival = max((t0 + j / rate + rec.b_last[j] for j in range(count) if rec.b_count[j]), default=t0)
    ok = len(ok_ids)
    return {
        "rate": rate,
        "duration_s": sent_for,
        "broadcasts": count,
        "accepted": ok,
        "http_errors": count - ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "sockets": sockets,
        "delivered": rec.received,
        "expected": expected,
        "lost": lost,
        "duplicates": rec.duplicates,
        "misrouted": rec.misrouted,
        "stale": rec.stale,
        "complete_broadcasts": len(complete),
        "fanout_p50_ms": percentile(complete, 50) if len(complete) == ok else None,
        "fanout_p99_ms": percentile(complete, 99) if len(complete) == ok else None,
        "fanout_max_ms": max(complete) if complete and len(complete) == ok else None,
        "fanout_note": ""
        if len(complete) == ok
        else f"{ok - len(complete)} of {ok} messages not on every socket {drain:g} s after the run",
        "delivered_per_s": _per(rec.received, max(sent_for, last_arrival - t0)),
        "sockets_closed": fleet.closed,
        **_cpu_fields(window, rec.received),
    }


def now_iso() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


__all__ = ["broadcast", "connect", "join", "percentile", "publisher_token", "rss_bytes", "targeted", "topic"]
