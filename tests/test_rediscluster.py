"""Redis Cluster: three primaries with a replica each, real processes on free ports, two service replicas."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .pushkit import vapid_pem
from .receiver import receiving
from .test_devices import ids, put, webpush
from .test_topics import connect, join
from .test_webhooks import admin, say, texts
from .test_webhooks import env as webhook_env
from .topology import ClusterTopology
from .utils import (
    ROOT,
    SECRET,
    TIMEOUT,
    Replica,
    ids_until,
    publish,
    publisher_headers,
    sockets_online,
    started,
    token,
    until,
)

TOPICS = json.dumps({"chat": {"join": "any", "publish": True, "presence": True}})


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterTopology]:
    with ClusterTopology() as topology:
        yield topology


@pytest.fixture(scope="module")
def on_cluster(cluster: ClusterTopology) -> Iterator[tuple[Replica, Replica]]:
    push = {"NOTIFY_VAPID_PRIVATE_KEY": vapid_pem(), "NOTIFY_VAPID_SUBJECT": "mailto:ops@example.com"}
    env = cluster.env(NOTIFY_TOPICS=TOPICS, NOTIFY_PUSH_ALLOWED_ORIGINS="https://push.example.com", **push)
    with started(Replica(env), Replica(env)) as (a, b):
        yield a, b


def channel_of(replica: Replica, stream: str) -> str:
    return f"{replica.env['NOTIFY_REDIS_PREFIX']}:{{{stream}}}:c"


def spread_users(cluster: ClusterTopology, replica: Replica, count: int = 3) -> list[str]:
    """Users whose streams live on every primary, `count` each."""
    by_primary: dict[int, list[str]] = {node.port: [] for node in cluster.primaries()}
    for n in range(1000):
        user = f"cl-{os.getpid()}-{n}"
        owner = cluster.owner(channel_of(replica, f"u:{user}")).port
        if len(by_primary[owner]) < count:
            by_primary[owner].append(user)
        if all(len(users) == count for users in by_primary.values()):
            return [user for users in by_primary.values() for user in users]
    raise AssertionError("could not spread users over every primary")


async def test_everything_works_on_a_cluster(cluster, on_cluster, http):
    """Users on every primary: delivery across replicas, broadcast, online, idempotency, inbox,
    topics, resume with `since`, and a glob-character user id that reaches exactly that user."""
    a, b = on_cluster
    users = [*spread_users(cluster, a), "a*"]
    bystander = await connect(b, "ab")
    sockets = {user: (await connect(a, user), await connect(b, user)) for user in users}
    for user in users:  # presence is written in the background: wait until Redis counts both sockets
        await until(lambda user=user: sockets_online(a, user) == 2, what=f"{user}'s sockets counted")
    for user in users:
        response = await publish(http, b, user, "hello", user)
        assert response.status_code == 202 and response.json()["online"] == 2
        for socket in sockets[user]:
            [frame] = await socket.notifications(1)
            assert frame["id"] == response.json()["id"] and frame["data"] == user
    await bystander.nothing(0.2)
    everyone = await publish(http, a, None, "all", 1)
    assert everyone.status_code == 202
    for socket in [bystander, *(s for pair in sockets.values() for s in pair)]:
        [frame] = await socket.notifications(1)
        assert frame["id"] == everyone.json()["id"] and frame["broadcast"] is True

    user = users[0]
    key = {"Idempotency-Key": "cluster-once", **publisher_headers()}
    first = await http.post(f"{a.url}/notify/{user}", json={"event": "once"}, headers=key)
    again = await http.post(f"{b.url}/notify/{user}", json={"event": "once"}, headers=key)
    assert again.json()["id"] == first.json()["id"] and again.json()["duplicate"] is True
    for socket in sockets[user]:
        assert len(await socket.notifications(1)) == 1
        await socket.nothing(0.2)
    inbox = await http.get(f"{b.url}/users/{user}/notifications", headers=publisher_headers())
    assert [n["id"] for n in inbox.json()["notifications"]][:1] == [first.json()["id"]]

    topic = "chat:cluster"
    members = [sockets[u][0] for u in users[:3]]
    for member in members:
        assert (await join(member, topic))["type"] == "joined"
    said = await http.post(f"{b.url}/topics/{topic}", json={"event": "m", "data": 1}, headers=publisher_headers())
    assert said.status_code == 202 and said.json()["members"] == 3
    for member in members:
        [frame] = await member.notifications(1)
        assert frame["id"] == said.json()["id"] and frame["topic"] == topic

    cursor = first.json()["id"]
    missed = [(await publish(http, a, user, "missed", n)).json()["id"] for n in range(3)]
    for socket in sockets[user]:
        await socket.notifications(3)
    resumed = await connect_since(b, user, cursor)
    assert [f["id"] for f in await resumed.notifications(3)] == missed
    for socket in [bystander, resumed, *(s for pair in sockets.values() for s in pair)]:
        await socket.close()


def test_devices_live_on_the_primary_of_their_users_stream(cluster, on_cluster):
    """Users on every primary: a device registered through one replica is listed by the other, and its
    keys are on the primary that owns the user's stream."""
    a, b = on_cluster
    prefix = a.env["NOTIFY_REDIS_PREFIX"]
    users = spread_users(cluster, a, count=1)
    for user in users:
        assert put(a.url, user, "laptop", webpush()).status_code == 200
        assert put(b.url, user, "desk", webpush()).status_code == 200
    for user in users:
        assert ids(b.url, user) == ids(a.url, user) == ["laptop", "desk"]
        owner = cluster.owner(channel_of(a, f"u:{user}"))
        assert owner.call("HLEN", f"{prefix}:{{u:{user}}}:d") == 3  # two devices and the order counter
    assert len({cluster.owner(channel_of(a, f"u:{u}")).port for u in users}) == len(cluster.primaries())


async def connect_since(replica: Replica, user: str, since: str) -> Any:
    import websockets

    from .utils import Client, token

    ws = await websockets.connect(f"{replica.ws_url}?token={token(user)}&since={since}", open_timeout=TIMEOUT)
    client = Client(ws)
    assert (await client.welcome())["recovered"] is True
    return client


async def test_channel_is_released_on_its_primary(cluster, on_cluster):
    """`PUBSUB SHARDNUMSUB` on the primary that owns the channel: held while a socket is there, released after."""
    a, _ = on_cluster
    user = spread_users(cluster, a, 1)[-1]
    channel = channel_of(a, f"u:{user}")
    owner = cluster.owner(channel)

    def subscribers() -> int:
        return int(owner.call("PUBSUB", "SHARDNUMSUB", channel)[1])

    socket = await connect(a, user)
    assert subscribers() == 1
    await socket.close()
    deadline = time.monotonic() + TIMEOUT
    while subscribers() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    assert subscribers() == 0


def test_a_seed_outside_any_cluster_stops_start_up(redis_server):
    """A redis+cluster:// seed that answers as a plain Redis: one clear line, and no start."""
    env = {
        **os.environ,
        "NOTIFY_JWT_SECRET": SECRET,
        "NOTIFY_REDIS_URL": f"redis+cluster://127.0.0.1:{redis_server.port}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "service", "--port", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"notify-service: NOTIFY_REDIS_URL: 127.0.0.1:{redis_server.port} is not a cluster node (cluster_enabled:0);"
        " use redis://host:port/db for one Redis"
    )


@pytest.mark.slow
async def test_primary_killed_mid_stream_loses_no_acknowledged_notification(http):
    """SIGKILL a primary while two publishers run, with NOTIFY_REDIS_REPLICAS_ACK=1: after the
    failover every notification answered 202 reached every socket of its user once, no socket
    closed, /readyz is back to 200, and once the killed node is back (as a replica) every publish is
    answered 202 again."""
    with ClusterTopology() as cluster:
        env = cluster.env(NOTIFY_REDIS_REPLICAS_ACK="1", NOTIFY_HISTORY_SIZE="5000")
        with started(Replica(env), Replica(env)) as (a, b):
            users = spread_users(cluster, a, 2)
            sockets = {user: (await connect(a, user), await connect(b, user)) for user in users}
            sent: dict[str, list[str]] = {user: [] for user in users}
            statuses: dict[int, list[int]] = {0: [], 1: []}  # per publisher, in order; 0: no answer
            stop = asyncio.Event()

            async def publisher(replica: Replica, offset: int) -> None:
                for i in range(offset, 20_000, 2):
                    if stop.is_set():
                        return
                    user = users[i % len(users)]
                    try:
                        response = await publish(http, replica, user, "seq", i)
                    except httpx.HTTPError:
                        statuses[offset].append(0)
                        continue
                    statuses[offset].append(response.status_code)
                    if response.status_code == 202:
                        sent[user].append(response.json()["id"])
                    else:
                        assert response.status_code == 503, response.text
                        await asyncio.sleep(0.02)

            tasks = [asyncio.create_task(publisher(a, 0)), asyncio.create_task(publisher(b, 1))]
            await asyncio.sleep(1.0)
            victim = cluster.owner(channel_of(a, f"u:{users[0]}"))
            killed_at = time.monotonic()
            victim.kill()
            await asyncio.to_thread(cluster.wait_healthy, 20)
            healed_s = time.monotonic() - killed_at
            for replica in (a, b):
                await wait_ready(http, replica, 15)
            ready_s = time.monotonic() - killed_at
            # The promoted primary has no replica to confirm a write (REPLICAS_ACK=1), so its slots answer
            # 503 until the killed node is back, as its replica. Then the service must be back to work, not
            # stuck on 503: each publisher's latest 20 publishes all answered 202.
            victim.start()
            await asyncio.to_thread(cluster.wait_healthy, 20)
            done_before = {n: len(answers) for n, answers in statuses.items()}
            await until(
                lambda: all(accepted_run(answers, done_before[n]) >= 20 for n, answers in statuses.items()),
                within=6 * TIMEOUT,
                what="20 publishes in a row answered 202 by each replica after the failover",
            )
            stop.set()
            await asyncio.gather(*tasks)
            refused = sum(1 for answers in statuses.values() for status in answers if status != 202)
            assert sum(map(len, sent.values())) > 100
            for user in users:
                for socket in sockets[user]:
                    got = await ids_until(socket, set(sent[user]))
                    assert len(got) == len(set(got)), f"{user}: duplicates"
                    assert set(sent[user]) <= set(got), f"{user}: lost {len(set(sent[user]) - set(got))}"
                    assert socket.ws.close_code is None
            print(f"FIGURES cluster_failover healed_s={healed_s:.2f} ready_s={ready_s:.2f} refused={refused}")


@pytest.mark.slow
async def test_a_slot_moved_while_publishing_loses_and_doubles_nothing(http):
    """Move the slot of a subscribed user to another primary (SETSLOT IMPORTING/MIGRATING, MIGRATE,
    SETSLOT NODE) while a backend publishes to that user: every socket gets each 202 once."""
    with ClusterTopology() as cluster:
        env = cluster.env()
        with started(Replica(env), Replica(env)) as (a, b):
            user = spread_users(cluster, a, 1)[0]
            sockets = [await connect(a, user), await connect(b, user)]
            sent: list[str] = []
            statuses: list[int] = []
            stop = asyncio.Event()

            async def publisher() -> None:
                for i in range(20_000):
                    if stop.is_set():
                        return
                    response = await publish(http, a if i % 2 else b, user, "seq", i)
                    statuses.append(response.status_code)
                    if response.status_code == 202:
                        sent.append(response.json()["id"])
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(publisher())
            await until(lambda: accepted_run(statuses, 0) >= 20, what="publishes accepted before the move")
            await asyncio.to_thread(move_slot, cluster, channel_of(a, f"u:{user}"))
            moved_after = len(statuses)
            # Publishes go on to the slot's new owner: the latest 50 since the move all answered 202.
            await until(
                lambda: accepted_run(statuses, moved_after) >= 50,
                within=6 * TIMEOUT,
                what="50 publishes in a row answered 202 after the move",
            )
            stop.set()
            await task
            for socket in sockets:
                got = await ids_until(socket, set(sent))
                assert len(got) == len(set(got)), "duplicates"
                assert set(sent) <= set(got)
            new_owner = cluster.owner(channel_of(a, f"u:{user}"))
            assert int(new_owner.call("PUBSUB", "SHARDNUMSUB", channel_of(a, f"u:{user}"))[1]) == 2


def accepted_run(statuses: list[int], since: int) -> int:
    """How many of the latest answers, all after the first `since`, were 202 in a row."""
    run = 0
    for status in reversed(statuses[since:]):
        if status != 202:
            break
        run += 1
    return run


def move_slot(cluster: ClusterTopology, key: str) -> None:
    """Move `key`'s slot, with every key in it, from its primary to another one."""
    from redis.crc import key_slot

    slot = key_slot(key.encode())
    source = cluster.owner(key)
    target = next(node for node in cluster.primaries() if node is not source)
    source_id, target_id = source.call("CLUSTER", "MYID"), target.call("CLUSTER", "MYID")
    target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    for _ in range(1000):
        keys = source.call("CLUSTER", "GETKEYSINSLOT", slot, 100)
        if not keys:
            break
        source.call("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for node in cluster.primaries():
        node.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def wait_ready(http: httpx.AsyncClient, replica: Replica, within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if (await http.get(replica.url + "/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{replica.url} not ready within {within}s:\n{replica.output()}")


async def test_a_burst_of_reads_waits_for_the_pool_on_a_cluster(cluster, http):
    """200 inbox reads at once through a pool of 2 (`NOTIFY_REDIS_POOL_SIZE`): all answered 200;
    the cluster client's own pools raise when they run out, so calls queue before them."""
    env = cluster.env(NOTIFY_TOPICS=TOPICS, NOTIFY_REDIS_POOL_SIZE="2")
    with started(Replica(env)) as (replica,):
        headers = {"Authorization": f"Bearer {token('cl-burst')}"}
        responses = await asyncio.gather(
            *(http.get(f"{replica.url}/me/notifications", headers=headers) for _ in range(200))
        )
        assert sorted({response.status_code for response in responses}) == [200]


async def test_webhooks_spread_over_the_cluster(cluster, http):
    """Webhook events from members of topics all over the cluster each reach the receiver once,
    signed, from a queue whose shards live on more than one primary."""
    with receiving() as receiver:
        config = cluster.env(**webhook_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            topics = [f"chat:cl-{os.getpid()}-{n}" for n in range(8)]
            sockets = [await say(a if n % 2 else b, topic, topic) for n, topic in enumerate(topics)]
            got = await receiver.wait_for(lambda r: texts(r) == set(topics))
            assert len(got) == len(topics) and receiver.unverified == 0
            prefix = config["NOTIFY_REDIS_PREFIX"]
            holders = {cluster.owner(f"{prefix}:{{ob{shard}}}:stats").port for shard in range(8)}
            used = {
                cluster.owner(f"{prefix}:{{ob{shard}}}:stats").port
                for shard in range(8)
                if cluster.owner(f"{prefix}:{{ob{shard}}}:stats").call("EXISTS", f"{prefix}:{{ob{shard}}}:stats")
            }
            assert len(holders) > 1 and len(used) > 1
            state = (await http.get(a.url + "/webhooks", headers=admin())).json()[0]
            assert state["delivered"] == len(topics) and state["pending"] == 0
            for socket in sockets:
                await socket.close()
