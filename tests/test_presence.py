"""Topic presence stays exact across two replicas on one Redis: no member is left behind by a join
that failed, and joins and leaves are announced once per interval, with counts exact afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

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
    """Every `presence` frame until one says `until_count` members."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.recv(timeout)
            if frame["type"] == "presence":
                frames.append(frame)
                if frame["count"] == until_count:
                    return frames


async def test_a_join_storm_is_announced_once_per_interval_and_counted_exactly(own_redis, http):
    """Members join a `join_leave` room on two replicas, then a third of them leave: an early member
    gets a few announcements, not one per join; above the member limit they carry the count alone;
    and the count is exact after each wave."""
    joiners, limit = 150, 60
    env = presence_env(own_redis, NOTIFY_JOIN_LEAVE_MAX_MEMBERS=str(limit))
    with started(Replica(env), Replica(env)) as replicas:
        topic = f"chat:{uid('storm')}"
        first_id = uid("first")
        first = await connect(replicas[0], first_id)
        assert (await join(first, topic))["count"] == 1
        sockets: list[Client] = []
        for n in range(joiners):
            sockets.append(await connect(replicas[n % 2], f"{uid('m')}-{n}"))

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
        assert (await members(http, replicas[1], topic))["count"] == joiners + 1

        leaving = joiners // 3
        await asyncio.gather(*(client.close() for client in sockets[:leaving]))
        after = await presence_frames(first, joiners + 1 - leaving, 6 * TIMEOUT)
        assert all("joined" not in frame for frame in after if frame["count"] > limit)
        assert len(after) <= 10, f"{len(after)} announcements for {leaving} leaves"
        assert (await members(http, replicas[0], topic))["count"] == joiners + 1 - leaving
        await asyncio.gather(*(client.close() for client in sockets[leaving:]))
        await first.close()
