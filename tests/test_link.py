"""The subscription link to Redis: what it does while it is rebuilt, and with streams it cannot hold.

The first test runs real replicas, one of them reaching Redis through a proxy that adds latency,
so a resubscription takes many round trips while sockets keep joining. The others drive the Redis
broker in-process against a real redis-server, where a cancellation can be aimed at one call.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator

import pytest

from service.broker import Broker, StreamRules, create_broker
from service.config.settings import Settings
from service.telemetry.metrics import Metrics

from .proxy import TcpProxy
from .test_faults import close_all, is_ready, wait_for
from .utils import SECRET, TIMEOUT, Client, RedisServer, Replica, cluster_env, publisher_headers, started

# Each way between replica B and Redis: a round trip of 60 ms, so a resubscription takes several
# hundred milliseconds, through which sockets keep joining.
LATENCY = 0.03


@pytest.fixture
def slow_proxy(own_redis: RedisServer) -> Iterator[TcpProxy]:
    p = TcpProxy(own_redis.port, delay=LATENCY).start()
    yield p
    p.stop()


async def test_streams_joined_while_resubscribing_are_all_subscribed(own_redis, slow_proxy, http):
    """Sockets keep opening on replica B (a new user's stream each) while B's subscription is
    rebuilt after `CLIENT KILL TYPE pubsub`: once B is ready again, every one of them receives
    what replica A publishes to its user. None is left unsubscribed behind a green probe."""
    env = cluster_env(own_redis)
    with started(Replica(env), Replica({**env, "NOTIFY_REDIS_URL": slow_proxy.url})) as (a, b):
        prefix = f"join-{uuid.uuid4().hex[:6]}-"
        clients: dict[str, Client] = {}
        flooding = asyncio.Event()
        flooding.set()

        async def joiner(worker: int) -> None:
            for n in range(100):
                if not flooding.is_set():
                    return
                user = f"{prefix}{worker}-{n}"
                client = await Client.connect(b, user)
                await client.welcome()
                clients[user] = client

        workers = [asyncio.create_task(joiner(w)) for w in range(8)]
        try:
            await wait_for(lambda: _true(len(clients) >= 16), 3 * TIMEOUT)
            own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
            # Joins go on through the whole rebuild: until B has been seen not ready, then ready.
            await wait_for(lambda: _not(is_ready(http, b)), TIMEOUT, step=0.01)
            await wait_for(lambda: is_ready(http, b), 3 * TIMEOUT)
        finally:
            flooding.clear()
            await asyncio.gather(*workers)

        users = sorted(clients)
        for start in range(0, len(users), 250):
            items = [{"user": user, "event": "after-rebuild"} for user in users[start : start + 250]]
            response = await http.post(a.url + "/notify", json=items, headers=publisher_headers())
            assert response.status_code == 200, response.text

        async def received(user: str) -> bool:
            try:
                await clients[user].notifications(1, timeout=2 * TIMEOUT)
            except TimeoutError:
                return False
            return True

        got = await asyncio.gather(*(received(user) for user in users))
        missing = [user for user, ok in zip(users, got, strict=True) if not ok]
        assert not missing, f"{len(missing)} of {len(users)} sockets got nothing: {missing[:5]}"
        await close_all(list(clients.values()))


async def _true(value: bool) -> bool:
    return value


async def _not(check: Awaitable[bool]) -> bool:
    return not await check


# ---- the Redis broker in-process, on a Redis of the test's own


def _rules(stream: str) -> StreamRules:
    return StreamRules()


@pytest.fixture
async def redis_broker(own_redis: RedisServer) -> AsyncIterator[tuple[Broker, list[tuple[str, str]]]]:
    settings = Settings(
        jwt_secret=SECRET,
        redis_url=own_redis.url,  # type: ignore[arg-type]
        redis_prefix=f"l{uuid.uuid4().hex[:8]}",
        probe_interval_seconds=0.2,
        probe_timeout_seconds=1.0,
        reconnect_max_seconds=0.5,
    )
    received: list[tuple[str, str]] = []
    impl = create_broker(settings, "replica-1", Metrics("replica-1"), _rules)

    async def on_lost() -> None:
        return None

    await impl.start(lambda stream, frame: received.append((stream, frame)), on_lost)
    await wait_for(lambda: _true(impl.ready), TIMEOUT)
    yield impl, received
    own_redis.resume()
    await impl.stop()


async def test_a_cancelled_subscribe_is_cancelled(own_redis, redis_broker):
    """A join whose caller is cancelled while Redis has not confirmed it (Redis hung) ends
    cancelled at once; it does not swallow the cancellation and carry on as if nothing happened."""
    impl, _ = redis_broker
    own_redis.pause()
    task = asyncio.create_task(impl.subscribe("u:cancelled"))
    await asyncio.sleep(0.05)  # let it send SSUBSCRIBE and wait for the confirmation
    assert not task.done()
    task.cancel()
    await asyncio.wait([task], timeout=TIMEOUT)
    own_redis.resume()
    assert task.done() and task.cancelled()


async def test_a_stream_that_cannot_be_subscribed_does_not_stop_the_others(own_redis, redis_broker, http):
    """A stream whose channel cannot be written (a lone surrogate in its name) is dropped: after a
    subscription blip the link is subscribed again and every other stream is delivered."""
    impl, received = redis_broker
    await impl.subscribe("u:bad-\ud800")
    await impl.subscribe("u:good")
    own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
    await wait_for(lambda: _true(not impl.ready), TIMEOUT, step=0.01)
    await wait_for(lambda: _true(impl.ready), 3 * TIMEOUT)
    published = await impl.publish("u:good", '"e"', "1", None)
    await wait_for(lambda: _true(any(published.id in frame for _, frame in received)), TIMEOUT)
