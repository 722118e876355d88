"""Topic presence stays exact across two replicas on one Redis: no member is left behind by a join
that failed, and joins and leaves are announced once per interval, with counts exact afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from .proxy import TcpProxy
from .test_asyncapi import check_server_frame
from .test_topics import connect, join, uid
from .utils import TIMEOUT, Client, RedisServer, Replica, cluster_env, publisher_headers, started, token

NAMESPACES = {"chat": {"join": "any", "presence": True, "join_leave": True}}


def presence_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    return cluster_env(
        redis,
        NOTIFY_TOPICS=json.dumps(NAMESPACES),
        NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS="0.5",
        NOTIFY_PRESENCE_EVENT_INTERVAL_SECONDS="0.5",
        **extra,
    )


async def members(http: httpx.AsyncClient, replica: Replica, topic: str) -> dict[str, Any]:
    response = await http.get(f"{replica.url}/topics/{topic}/presence", headers=publisher_headers())
    assert response.status_code == 200, response.text
    return dict(response.json())


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Poll until `check` holds (True) or the time is up (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return True
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.2)
    return False


async def test_joins_that_fail_leave_no_member_behind(own_redis, http):
    """A join answered `unavailable` (its Redis call past the deadline, run by Redis later) and an
    SSE stream dropped while its joins wait: neither user stays a member once Redis is back."""
    env = presence_env(own_redis, NOTIFY_PUBLISH_TIMEOUT_SECONDS="0.5")
    with started(Replica(env), Replica(env)) as (a, b):
        topic = f"chat:{uid('ghost')}"
        watcher_id, late_id, dropped_id = uid("watch"), uid("late"), uid("dropped")
        watcher = await connect(b, watcher_id)
        assert (await join(watcher, topic))["type"] == "joined"
        late = await connect(a, late_id)

        own_redis.pause()  # each presence script waits in Redis's input, and runs once it resumes
        try:
            await late.send({"type": "join", "topic": topic})
            refused = await late.recv(3 * TIMEOUT)
            assert refused["type"] == "error" and refused["code"] == "unavailable", refused
            stream = f"{a.url}/events?token={token(dropped_id)}&topics={topic},chat:{uid('other')}"
            async with httpx.AsyncClient(timeout=TIMEOUT) as sse:
                try:
                    async with asyncio.timeout(0.3), sse.stream("GET", stream) as response:
                        async for _ in response.aiter_bytes():
                            pass
                except TimeoutError:
                    pass  # the client leaves while the stream's joins wait on Redis
        finally:
            own_redis.resume()

        async def only_the_watcher() -> bool:
            return (await members(http, b, topic))["users"] == [watcher_id]

        assert await until(only_the_watcher, 6 * TIMEOUT), await members(http, b, topic)
        # And it stays so: nothing writes the failed joins back (a rewrite after the subscription
        # came back writes what the replica holds).
        await asyncio.sleep(2.0)
        assert (await members(http, a, topic))["users"] == [watcher_id]
        await late.close()
        await watcher.close()


async def test_a_join_stands_when_only_the_note_after_it_fails(own_redis, http):
    """Redis refuses the note of which streams a replica is in (SADD), after the presence script
    itself ran: the join stands, on the replica as in Redis, and its leave is told as any other."""
    own_redis.command("ACL", "SETUSER", "default", "-sadd")
    env = presence_env(own_redis)
    with started(Replica(env), Replica(env)) as (a, b):
        topic = f"chat:{uid('note')}"
        watcher_id, member_id = uid("watch"), uid("member")
        watcher, member = await connect(b, watcher_id), await connect(a, member_id)
        assert (await join(watcher, topic))["type"] == "joined"
        answer = await join(member, topic)
        assert answer["type"] == "joined" and answer["count"] == 2, answer
        assert (await members(http, b, topic))["users"] == sorted([watcher_id, member_id])
        await member.send({"type": "leave", "topic": topic})

        async def only_the_watcher() -> bool:
            return (await members(http, b, topic))["users"] == [watcher_id]

        assert await until(only_the_watcher, 3 * TIMEOUT), await members(http, b, topic)
        await member.close()
        await watcher.close()


async def presence_frames(client: Client, until_count: int, timeout: float) -> list[dict[str, Any]]:
    """Every `presence` frame until one says `until_count` members, each checked against the spec."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.recv(timeout)
            if frame["type"] == "presence":
                check_server_frame(frame)
                frames.append(frame)
                if frame["count"] == until_count:
                    return frames


async def test_a_join_storm_is_announced_once_per_interval_and_counted_exactly(own_redis, http):
    """Members join a `join_leave` room on two replicas, then a third of them leave: an early member
    gets a few announcements, not one per join; above the member limit they carry the count alone;
    and the count is exact after each wave."""
    env = presence_env(own_redis, NOTIFY_JOIN_LEAVE_MAX_MEMBERS="60")
    with started(Replica(env), Replica(env)) as replicas:
        await join_storm(http, replicas, joiners=150, limit=60)


async def test_the_embedded_broker_announces_the_same_way(http):
    """One replica without Redis: the same announcements, the same limit, the same exact counts."""
    env = {
        "NOTIFY_TOPICS": json.dumps(NAMESPACES),
        "NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS": "0.5",
        "NOTIFY_PRESENCE_EVENT_INTERVAL_SECONDS": "0.5",
        "NOTIFY_JOIN_LEAVE_MAX_MEMBERS": "30",
    }
    with started(Replica(env)) as replicas:
        await join_storm(http, replicas, joiners=75, limit=30)


async def join_storm(http: httpx.AsyncClient, replicas: tuple[Replica, ...], joiners: int, limit: int) -> None:
    topic = f"chat:{uid('storm')}"
    first = await connect(replicas[0], uid("first"))
    assert (await join(first, topic))["count"] == 1
    sockets: list[Client] = []
    for n in range(joiners):
        sockets.append(await connect(replicas[n % len(replicas)], f"{uid('m')}-{n}"))

    async def join_quietly(client: Client) -> None:
        assert (await join(client, topic))["type"] == "joined"

    joining = asyncio.gather(*(join_quietly(client) for client in sockets))
    frames = await presence_frames(first, joiners + 1, 6 * TIMEOUT)
    await joining
    assert len(frames) <= joiners // 5, f"{len(frames)} announcements for {joiners} joins"
    named = [user for frame in frames if "joined" in frame for user in frame["joined"]]
    assert len(named) == len(set(named)), "nobody is announced twice"
    assert all(frame["count"] > limit for frame in frames if "joined" not in frame)
    assert all(frame["count"] <= limit for frame in frames if "joined" in frame)
    assert (await members(http, replicas[-1], topic))["count"] == joiners + 1

    leaving = joiners // 3
    await asyncio.gather(*(client.close() for client in sockets[:leaving]))
    after = await presence_frames(first, joiners + 1 - leaving, 6 * TIMEOUT)
    assert all("joined" not in frame for frame in after if frame["count"] > limit)
    assert len(after) <= 10, f"{len(after)} announcements for {leaving} leaves"
    assert (await members(http, replicas[0], topic))["count"] == joiners + 1 - leaving
    await asyncio.gather(*(client.close() for client in sockets[leaving:]))
    await first.close()


async def metric(http: httpx.AsyncClient, replica: Replica, name: str) -> float:
    text = (await http.get(f"{replica.url}/metrics")).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_closing_many_memberships_at_once_keeps_both_replicas_ready(own_redis, http):
    """Sockets in 64 topics each close together on two replicas, Redis a millisecond away: neither
    replica's `/readyz` fails nor its subscription is rebuilt while the leaves are swept; each topic
    is swept by one replica; every topic is empty after the grace."""
    users, per_user, topics_each = 4, 10, 64
    proxy = TcpProxy(own_redis.port, delay=0.001).start()
    try:
        env = cluster_env(
            own_redis,
            NOTIFY_REDIS_URL=proxy.url,
            NOTIFY_TOPICS=json.dumps({"room": {"join": "any", "presence": True}}),
            NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS="0.5",
            NOTIFY_MAX_INBOUND_RATE="1000",  # 64 joins at once
        )
        with started(Replica(env), Replica(env)) as replicas:
            run = uid("close")
            sockets: list[tuple[Client, list[str]]] = []
            for n in range(users * per_user):
                client = await connect(replicas[n % 2], f"{run}-user-{n % users}")
                topics = [f"room:{run}-{n}-{t}" for t in range(topics_each)]
                for topic in topics:
                    await client.send({"type": "join", "topic": topic})
                sockets.append((client, topics))
            for client, topics in sockets:
                answers = [await client.recv(3 * TIMEOUT) for _ in topics]
                assert all(answer["type"] == "joined" for answer in answers)
            rebuilt = [await metric(http, replica, "notify_broker_reconnects_total") for replica in replicas]
            streams = len(sockets) * topics_each

            unready: list[int] = []
            done = asyncio.Event()

            async def watch_readiness() -> None:
                while not done.is_set():
                    for replica in replicas:
                        status = (await http.get(f"{replica.url}/readyz")).status_code
                        if status != 200:
                            unready.append(status)
                    await asyncio.sleep(0.1)

            watcher = asyncio.create_task(watch_readiness())
            await asyncio.gather(*(client.close() for client, _ in sockets))

            async def all_swept() -> bool:
                swept = sum([await metric(http, replica, "notify_presence_sweeps_total") for replica in replicas])
                return swept >= streams

            swept_in_time = await until(all_swept, 12 * TIMEOUT)
            done.set()
            await watcher
            assert swept_in_time
            assert not unready, f"/readyz answered {unready} while the leaves were swept"
            assert [await metric(http, replica, "notify_broker_reconnects_total") for replica in replicas] == rebuilt
            swept = sum([await metric(http, replica, "notify_presence_sweeps_total") for replica in replicas])
            assert swept < 1.5 * streams, f"{swept} sweeps for {streams} topics: each is swept by one replica"
            for _, topics in sockets[::per_user]:
                assert (await members(http, replicas[1], topics[-1]))["count"] == 0
    finally:
        proxy.stop()
