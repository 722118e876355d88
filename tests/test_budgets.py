"""Budgets against abuse, on real replicas and a real Redis: member lists that cost one bounded read
however many ask, a pool that queues instead of failing, per-user publish rates, and namespaces
whose topics holding history are counted."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import redis

from .test_topics import connect, join, uid
from .utils import TIMEOUT, Client, RedisServer, Replica, cluster_env, publisher_headers, started, token

CHAT = {"chat": {"join": "any", "publish": True, "presence": True}}
BROKERS = ["redis", "embedded"]


def env_for(broker: str, server: RedisServer, **env: str) -> dict[str, str]:
    """The environment of replicas on Redis (a key namespace of their own) or on the embedded broker."""
    return cluster_env(server, **env) if broker == "redis" else env


def _member_reads(server: RedisServer) -> int:
    """How many times Redis was asked for a members hash's names (either command reads them)."""
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=TIMEOUT)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("hkeys", "hscan"))


async def _answers(client: Client, kinds: set[str], count: int) -> list[dict[str, Any]]:
    """The next `count` frames of these kinds (others met on the way are skipped)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(3 * TIMEOUT):
        while len(frames) < count:
            frame = await client.recv()
            if frame["type"] in kinds:
                frames.append(frame)
    return frames


async def test_member_lists_are_one_shared_read_and_starve_nobody(own_redis, http):
    """120 members over two replicas; 80 of them ask for the list three times, 250 ms apart, while
    another user reads their inbox 100 times at once on the same replica through a pool of 2.
    Every ask is answered with the whole list, every inbox read 200, and Redis reads the member
    hash a handful of times, not once per ask."""
    env = cluster_env(own_redis, NOTIFY_TOPICS=json.dumps(CHAT), NOTIFY_REDIS_POOL_SIZE="2")
    with started(Replica(env), Replica(env)) as (a, b):
        topic = f"chat:{uid('crowd')}"
        users = [uid("m") for _ in range(120)]
        clients = await asyncio.gather(*(connect(a if i % 2 else b, user) for i, user in enumerate(users)))
        try:
            for answer in await asyncio.gather(*(join(client, topic) for client in clients)):
                assert answer["type"] == "joined", answer
            askers, reader = clients[:80], token(uid("reader"))
            before = _member_reads(own_redis)

            async def inbox() -> int:
                response = await http.get(f"{a.url}/me/notifications", headers={"Authorization": f"Bearer {reader}"})
                return response.status_code

            answers: list[dict[str, Any]] = []
            for _ in range(3):
                await asyncio.gather(*(asker.send({"type": "presence", "topic": topic}) for asker in askers))
                statuses = await asyncio.gather(*(inbox() for _ in range(100)))
                assert statuses == [200] * 100, sorted(set(statuses))
                answers += [frame for asker in askers for frame in await _answers(asker, {"members", "error"}, 1)]
                await asyncio.sleep(0.25)
            assert all(frame["type"] == "members" for frame in answers), [f for f in answers if f["type"] == "error"]
            assert all(frame["count"] == 120 and frame["users"] == sorted(users) for frame in answers)
            rest = await asyncio.gather(
                *(http.get(f"{b.url}/topics/{topic}/presence", headers=publisher_headers()) for _ in range(50))
            )
            assert {response.status_code for response in rest} == {200}
            assert all(response.json()["count"] == 120 for response in rest)
            reads = _member_reads(own_redis) - before
            # 290 asks in about two seconds: at most a read per topic, replica and second (and one
            # after each local join), never one per ask.
            assert reads <= 12, f"{reads} reads of the member hash for 290 asks"
        finally:
            await asyncio.gather(*(client.close() for client in clients))


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_socket_asking_for_members_too_often_is_told_to_wait(broker, redis_server):
    env = env_for(broker, redis_server, NOTIFY_TOPICS=json.dumps(CHAT), NOTIFY_PRESENCE_RATE="1")
    with started(Replica(env)) as (replica,):
        topic = f"chat:{uid('room')}"
        asker, other = await connect(replica, uid("asker")), await connect(replica, uid("other"))
        assert (await join(asker, topic))["type"] == (await join(other, topic))["type"] == "joined"
        for _ in range(8):
            await asker.send({"type": "presence", "topic": topic})
        answers = await _answers(asker, {"members", "error"}, 8)
        assert [frame["type"] for frame in answers[:5]] == ["members"] * 5  # a burst of five
        refused = [frame for frame in answers[5:] if frame["type"] == "error"]
        assert refused and all(f["code"] == "rate_limited" and f["topic"] == topic for f in refused), answers
        assert all(0 < frame["retry_after"] <= 1 for frame in refused)
        # Another socket's asks are its own.
        await other.send({"type": "presence", "topic": topic})
        assert (await _answers(other, {"members", "error"}, 1))[0]["count"] == 2
        await asker.close()
        await other.close()


async def _publish_all(client: Client, topic: str, count: int) -> list[dict[str, Any]]:
    for n in range(count):
        await client.send({"type": "publish", "topic": topic, "event": "msg", "data": {"n": n}})
    return await _answers(client, {"published", "error"}, count)


@pytest.mark.parametrize("broker", BROKERS)
async def test_one_user_publishes_at_most_the_member_rate_over_all_sockets_and_topics(broker, redis_server):
    """With the defaults: a user's three sockets, each in its own topic, send 15 messages each at
    once; about five a second pass (the rate is the user's, not each socket's), the rest are
    refused `rate_limited` with a wait, and another user on the replica publishes as usual."""
    env = env_for(broker, redis_server, NOTIFY_TOPICS=json.dumps(CHAT))
    with started(Replica(env)) as (replica,):
        spammer = uid("spam")
        sockets = [await connect(replica, spammer) for _ in range(3)]
        topics = [f"chat:{uid('r')}" for _ in sockets]
        for client, topic in zip(sockets, topics, strict=True):
            assert (await join(client, topic))["type"] == "joined"
        started_at = time.monotonic()
        answers = await asyncio.gather(*(_publish_all(c, t, 15) for c, t in zip(sockets, topics, strict=True)))
        elapsed = time.monotonic() - started_at
        frames = [frame for answer in answers for frame in answer]
        published = [frame for frame in frames if frame["type"] == "published"]
        refused = [frame for frame in frames if frame["type"] == "error"]
        assert 5 <= len(published) <= 5 + 5 * elapsed + 1, (len(published), elapsed)
        assert len(refused) == 45 - len(published)
        assert all(f["code"] == "rate_limited" and 0 < f["retry_after"] <= 1 for f in refused), refused[:3]
        bystander = await connect(replica, uid("calm"))
        assert (await join(bystander, topics[0]))["type"] == "joined"
        assert [f["type"] for f in await _publish_all(bystander, topics[0], 3)] == ["published"] * 3
        for client in [*sockets, bystander]:
            await client.close()


def _history_keys(server: RedisServer, prefix: str) -> int:
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=TIMEOUT)
    try:
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:{{t:chat:*}}:h", count=1000))
    finally:
        client.close()


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_namespace_holds_history_in_at_most_max_topics(broker, own_redis):
    """`max_topics: 4`: members on two replicas (one, embedded) publish into eight new topics; four
    hold history, the others are refused `namespace_full` (REST: 429) and store nothing, while
    the four admitted topics still take messages."""
    namespaces = {"chat": {"join": "any", "publish": True, "max_topics": 4}}
    env = env_for(broker, own_redis, NOTIFY_TOPICS=json.dumps(namespaces), NOTIFY_MEMBER_PUBLISH_RATE="off")
    replicas = (Replica(env), Replica(env)) if broker == "redis" else (Replica(env),)
    with started(*replicas):
        topics = [f"chat:{uid('t')}" for _ in range(8)]
        outcomes: dict[str, str] = {}
        for n, topic in enumerate(topics):
            client = await connect(replicas[n % len(replicas)], uid("u"))
            assert (await join(client, topic))["type"] == "joined"
            answer = (await _publish_all(client, topic, 1))[0]
            outcomes[topic] = answer["type"] if answer["type"] == "published" else answer["code"]
            await client.close()
        held = [topic for topic in topics if outcomes[topic] == "published"]
        assert held == topics[:4] and {outcomes[t] for t in topics[4:]} == {"namespace_full"}, outcomes
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            url = replicas[-1].url
            again = await http.post(f"{url}/topics/{held[0]}", json={"event": "e"}, headers=publisher_headers())
            assert again.status_code == 202
            refused = await http.post(f"{url}/topics/{topics[5]}", json={"event": "e"}, headers=publisher_headers())
            assert refused.status_code == 429 and refused.json()["error"] == "namespace_full", refused.text
            for topic in topics:
                history = await http.get(f"{url}/topics/{topic}/history", headers=publisher_headers())
                assert bool(history.json()["notifications"]) == (topic in held), topic
        if broker == "redis":
            assert _history_keys(own_redis, env["NOTIFY_REDIS_PREFIX"]) == 4
