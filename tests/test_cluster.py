"""Two replicas sharing Redis: delivery crosses replicas exactly once, with exact channels.

The tests that cross replicas run twice: on one Redis, and on a Redis Cluster of three primaries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from .topology import ClusterTopology
from .utils import Client, Replica, publish, publisher_headers, sockets_online, started, until


@pytest.fixture(scope="module")
def cluster_pair() -> Iterator[tuple[Replica, Replica]]:
    with ClusterTopology() as cluster:
        env = cluster.env()
        with started(Replica(env), Replica(env)) as replicas:
            yield replicas  # type: ignore[misc]


@pytest.fixture(params=["redis", "cluster"])
def both(request: pytest.FixtureRequest) -> tuple[Replica, Replica]:
    """Two replicas on one Redis, then on a Redis Cluster."""
    return request.getfixturevalue("pair" if request.param == "redis" else "cluster_pair")  # type: ignore[no-any-return]


def uid(prefix: str = "c") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_each_socket_on_both_replicas_gets_it_exactly_once(both, http):
    """A user with sockets on both replicas gets each notification once per socket; others get nothing."""
    a, b = both
    user, other = uid(), uid()
    sockets = [await Client.connect(a, user), await Client.connect(a, user), await Client.connect(b, user)]
    bystanders = [await Client.connect(a, other), await Client.connect(b, other)]
    for s in sockets + bystanders:
        await s.welcome()
    # Presence is written in the background: wait until Redis counts all three sockets.
    await until(lambda: sockets_online(a, user) == 3, what="3 sockets online")
    ids = []
    for n, origin in enumerate([a, b, a]):
        response = await publish(http, origin, user, "x", n)
        assert response.status_code == 202
        ids.append(response.json()["id"])
    assert response.json()["online"] == 3, "online counts sockets across replicas"
    for s in sockets:
        frames = await s.notifications(3)
        assert [f["id"] for f in frames] == ids
        await s.nothing(0.2)
    for s in bystanders:
        await s.nothing(0.1)
    for s in sockets + bystanders:
        await s.close()


async def test_a_welcomed_user_is_online_at_once_for_a_publish_on_the_other_replica(both, http):
    """A user's first socket on a replica is in Redis before its welcome: a publish made right
    after it, anywhere, counts the user online (an offline webhook or push hangs on that count)."""
    a, b = both
    for _ in range(10):
        user = uid()
        socket = await Client.connect(b, user)
        await socket.welcome()
        response = await publish(http, a, user, "x", 1)
        assert response.status_code == 202 and response.json()["online"] == 1
        await socket.notifications(1)
        await socket.close()


async def test_broadcast_reaches_everyone_on_both_replicas(both, http):
    """POST /broadcast on one replica reaches every socket on every replica, once."""
    a, b = both
    clients = [await Client.connect(r, uid("bc")) for r in (a, b, a, b)]
    for c in clients:
        await c.welcome()
    response = await publish(http, b, None, "all", {"v": 2})
    assert response.status_code == 202
    for c in clients:
        [frame] = await c.notifications(1)
        assert frame["id"] == response.json()["id"] and frame["broadcast"] is True
        await c.nothing(0.1)
        await c.close()


async def test_order_is_kept_across_replicas(both, http):
    """One publisher's notifications to one user arrive in order on the other replica."""
    a, b = both
    user = uid()
    client = await Client.connect(b, user)
    await client.welcome()
    for n in range(200):
        assert (await publish(http, a, user, "seq", n)).status_code == 202
    assert [f["data"] for f in await client.notifications(200)] == list(range(200))
    await client.close()


async def test_glob_ids_reach_exactly_that_user_across_replicas(both, http, redis_server):
    """Channels are exact: `a*` on one replica does not reach `ab` on the other, and no pattern is subscribed."""
    a, b = both
    suffix = uuid.uuid4().hex[:6]
    star, plain = await Client.connect(b, f"a*{suffix}"), await Client.connect(b, f"ab{suffix}")
    question, bracket = await Client.connect(b, f"user?1{suffix}"), await Client.connect(b, f"[x]{suffix}")
    for c in (star, plain, question, bracket):
        await c.welcome()
    for target, client in ((f"a*{suffix}", star), (f"user?1{suffix}", question), (f"[x]{suffix}", bracket)):
        response = await http.post(
            f"{a.url}/notify/{quote(target, safe='')}", json={"event": "g"}, headers=publisher_headers()
        )
        assert response.status_code == 202
        assert (await client.notifications(1))[0]["event"] == "g"
    await plain.nothing(0.3)
    if a.env["NOTIFY_REDIS_URL"].startswith("redis://"):
        assert redis_server.command("PUBSUB", "NUMPAT") == "0"
    for c in (star, plain, question, bracket):
        await c.close()


async def test_channel_is_released_when_the_last_socket_leaves(pair, redis_server):
    """A replica subscribes a user's (sharded) channel with the first socket and unsubscribes after the last."""
    a, _ = pair
    user = uid()
    channel = f"{a.env['NOTIFY_REDIS_PREFIX']}:{{u:{user}}}:c"

    def subscribers() -> int:
        import redis

        client = redis.Redis(port=redis_server.port)
        try:
            return int(client.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])
        finally:
            client.close()

    first, second = await Client.connect(a, user), await Client.connect(a, user)
    await first.welcome()
    await second.welcome()
    await until(lambda: sockets_online(a, user) == 2, what="both sockets counted")
    assert subscribers() == 1
    await first.close()
    await until(lambda: sockets_online(a, user) == 1, what="the first socket's leave handled")
    assert subscribers() == 1, "released while a socket is left"
    await second.close()
    await until(lambda: subscribers() == 0, what="the channel released")
