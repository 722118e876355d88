"""The broker contract, checked on both implementations (embedded and Redis) in-process."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from service.broker import Broker, MarkedRead, StreamRules, create_broker
from service.config.settings import Settings
from service.core.errors import BrokerUnavailable
from service.core.ids import id_key
from service.telemetry.metrics import Metrics

from .utils import SECRET


def _rules(stream: str) -> StreamRules:
    return StreamRules()


@pytest.fixture(params=["memory", "redis"])
async def broker(request, redis_server) -> AsyncIterator[tuple[Broker, list]]:
    url = redis_server.url if request.param == "redis" else None
    settings = Settings(
        jwt_secret=SECRET,
        redis_url=url,
        redis_prefix=f"b{uuid.uuid4().hex[:8]}",  # type: ignore[arg-type]
        history_size=5,
        probe_interval_seconds=0.2,
    )
    received: list[tuple[str | None, str]] = []
    impl = create_broker(settings, "replica-1", Metrics("replica-1"), _rules)

    async def on_lost() -> None:
        return None

    await impl.start(lambda target, frame: received.append((target, frame)), on_lost)
    for _ in range(100):
        if impl.ready:
            break
        await asyncio.sleep(0.02)
    yield impl, received
    await impl.stop()


async def eventually(check, timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    assert check()


async def test_publish_reaches_subscribers_only(broker):
    """A subscribed user's frame arrives whole; an unsubscribed user's does not."""
    impl, received = broker
    await impl.subscribe("u:a*")
    published = await impl.publish("u:a*", '"e"', '{"x":1}', None)
    await impl.publish("u:ab", '"e"', "2", None)
    await eventually(lambda: len(received) >= 1)
    await asyncio.sleep(0.1)
    assert len(received) == 1
    target, frame = received[0]
    assert target == "u:a*"
    assert orjson.loads(frame) == {
        "type": "notification",
        "id": published.id,
        "event": "e",
        "data": {"x": 1},
        "ts": published.ts,
    }


async def test_ids_are_unique_and_ordered_within_each_stream(broker):
    """Each stream has its own sequence: ids only grow within it, whatever other streams do."""
    impl, _ = broker
    streams = ("u:u1", "b", "u:u2", "u:u1", "b", "t:x", "u:u1")
    published = [(stream, (await impl.publish(stream, '"e"', "null", None)).id) for stream in streams]
    for stream in set(streams):
        ids = [id_ for s, id_ in published if s == stream]
        assert len(set(ids)) == len(ids) and sorted(ids, key=id_key) == ids
    frames = (await impl.history("u:u1", "0-0", 10)).frames
    assert [orjson.loads(f)["id"] for f in frames] == [id_ for s, id_ in published if s == "u:u1"]


async def test_history_is_bounded_and_knows_what_it_lost(broker):
    """History keeps the newest N; resuming before the trimmed ones is not recovered."""
    impl, _ = broker
    ids = [(await impl.publish("u:h", '"e"', str(n), None)).id for n in range(8)]
    page = await impl.history("u:h", ids[2], 100)
    assert [orjson.loads(f)["data"] for f in page.frames] == [3, 4, 5, 6, 7] and page.recovered
    page = await impl.history("u:h", ids[1], 100)
    assert not page.recovered
    empty = await impl.history("u:nobody", ids[-1], 100)
    assert empty.frames == [] and empty.recovered


async def test_read_marker_clamps_and_never_moves_back(broker):
    impl, received = broker
    await impl.subscribe("u:r")
    ids = [(await impl.publish("u:r", '"e"', str(n), None)).id for n in range(4)]
    assert await impl.mark_read("r", ids[1]) == MarkedRead(2, ids[1])
    assert await impl.mark_read("r", ids[0]) == MarkedRead(2), "never back, and not said to have moved"
    assert await impl.mark_read("r", "99999999999999-1") == MarkedRead(0, ids[3]), "clamped to the newest entry"
    inbox = await impl.inbox("r", None, 10)
    assert inbox.unread == 0 and len(inbox.frames) == 4
    assert (await impl.read_state("r", ids[2])).read
    await eventually(lambda: any(f == '{"type":"unread","count":0}' for _, f in received))


async def test_idempotency_key_returns_the_first(broker):
    impl, received = broker
    first = await impl.publish("u:i", '"e"', "1", "k1")
    again = await impl.publish("u:i", '"e"', "1", "k1")
    assert again.id == first.id and again.duplicate and not first.duplicate
    assert len((await impl.inbox("i", None, 10)).frames) == 1


async def test_redis_publish_fails_fast_when_unreachable():
    """An unreachable Redis makes publish raise BrokerUnavailable quickly, never return."""
    from .utils import free_port

    settings = Settings(jwt_secret=SECRET, redis_url=f"redis://127.0.0.1:{free_port()}/0")  # type: ignore[arg-type]
    impl = create_broker(settings, "r", Metrics("r"), _rules)

    async def on_lost() -> None:
        return None

    await impl.start(lambda *_: None, on_lost)
    try:
        assert not impl.ready
        async with asyncio.timeout(2):
            with pytest.raises(BrokerUnavailable):
                await impl.publish("u:x", '"e"', "1", None)
    finally:
        await impl.stop()


async def test_concurrent_publishes_each_get_their_own_answer(broker):
    """Publishes in flight together (pipelined on one Redis connection) each get their own id, and
    are delivered and stored in the order of those ids."""
    impl, received = broker
    await impl.subscribe("u:c")
    results = await asyncio.gather(
        *(impl.publish("u:c", '"e"', str(n), f"key-{n}" if n % 3 else None) for n in range(200))
    )
    ids = [r.id for r in results]
    assert len(set(ids)) == 200 and not any(r.duplicate for r in results)
    await eventually(lambda: sum(1 for target, _ in received if target == "u:c") == 200)
    delivered = [orjson.loads(frame) for target, frame in received if target == "u:c"]
    assert [f["id"] for f in delivered] == sorted(ids, key=id_key)
    assert {f["id"]: f["data"] for f in delivered} == {r.id: n for n, r in enumerate(results)}
    again = await impl.publish("u:c", '"e"', "1", "key-1")
    assert again.duplicate and again.id == ids[1]


async def test_publish_survives_a_flushed_script_cache(redis_server):
    """Redis restarted or SCRIPT FLUSH: the next publish loads the script again instead of failing."""
    import redis.asyncio as aioredis

    settings = Settings(jwt_secret=SECRET, redis_url=redis_server.url, redis_prefix=f"f{uuid.uuid4().hex[:8]}")  # type: ignore[arg-type]
    impl = create_broker(settings, "r", Metrics("r"), _rules)

    async def on_lost() -> None:
        return None

    await impl.start(lambda *_: None, on_lost)
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        first = await impl.publish("u:s", '"e"', "1", None)
        await admin.script_flush()
        second = await impl.publish("u:s", '"e"', "2", None)
        assert id_key(second.id) > id_key(first.id)
        assert [orjson.loads(f)["data"] for f in (await impl.history("u:s", "0-1", 10)).frames] == [1, 2]
    finally:
        await admin.aclose()
        await impl.stop()


def test_raw_connection_reports_a_closed_link_as_a_redis_error(redis_server):
    """On the service's loop (uvloop), a write on a dropped raw connection is a redis ConnectionError,
    which every caller treats as Redis being unavailable, not the loop's RuntimeError."""
    import redis.asyncio as aioredis
    import uvloop
    from redis.exceptions import ConnectionError as RedisConnectionError

    from service.broker.redis.resp import RawConnection, command

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        raw = await RawConnection.open(client)
        try:
            raw.write(command("PING"))
            assert await raw.replies() == ["PONG"]
            raw.abort()
            await asyncio.sleep(0.01)
            with pytest.raises(RedisConnectionError):
                raw.write(command("PING"))
        finally:
            await client.aclose()

    uvloop.run(scenario())


def test_raw_connection_hands_replies_to_its_sink_in_order_and_a_sink_that_raises_ends_it(redis_server):
    """Replies that came before the sink was given reach it first, then each as it arrives, in order;
    a sink that raises ends the connection, and `broken()` raises what it raised."""
    import redis.asyncio as aioredis
    import uvloop
    from redis.exceptions import ConnectionError as RedisConnectionError

    from service.broker.redis.resp import RawConnection, command

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        raw = await RawConnection.open(client)
        try:
            raw.write(command("ECHO", "first") + command("ECHO", "second"))
            assert await raw.replies() == ["first", "second"]
            raw.write(command("ECHO", "early"))
            await asyncio.sleep(0.05)  # arrives while nobody reads
            got: list[str] = []
            arrived = asyncio.Event()

            def sink(replies: list[str]) -> None:
                got.extend(replies)
                arrived.set()
                if "stop" in replies:
                    raise ValueError("the reader gave up")

            raw.sink(sink)
            assert got == ["early"]
            for word in ("a", "b", "c"):
                arrived.clear()
                raw.write(command("ECHO", word))
                await asyncio.wait_for(arrived.wait(), 5)
            assert got == ["early", "a", "b", "c"]
            raw.write(command("ECHO", "stop"))
            with pytest.raises(ValueError, match="the reader gave up"):
                await asyncio.wait_for(raw.broken(), 5)
            with pytest.raises(RedisConnectionError):
                raw.write(command("PING"))
        finally:
            raw.abort()
            await client.aclose()

    uvloop.run(scenario())


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_history_older_than_the_ttl_is_never_served(backend, redis_server):
    """The age bound holds on every read, even when a later publish kept the stream alive: an entry
    older than NOTIFY_HISTORY_TTL_SECONDS is neither replayed, nor in the inbox, nor unread."""
    url = redis_server.url if backend == "redis" else None
    settings = Settings(
        jwt_secret=SECRET, redis_url=url, redis_prefix=f"t{uuid.uuid4().hex[:8]}", history_ttl_seconds=1
    )  # type: ignore[arg-type]
    impl = create_broker(settings, "r", Metrics("r"), _rules)

    async def on_lost() -> None:
        return None

    await impl.start(lambda *_: None, on_lost)
    try:
        old = await impl.publish("u:ttl", '"e"', "1", None)
        await asyncio.sleep(0.7)
        young = await impl.publish("u:ttl", '"e"', "2", None)
        await asyncio.sleep(0.5)  # `old` is now past the bound, `young` is not
        page = await impl.history("u:ttl", "0-0", 10)
        assert [orjson.loads(f)["id"] for f in page.frames] == [young.id]
        inbox = await impl.inbox("ttl", None, 10)
        assert [orjson.loads(f)["id"] for f in inbox.frames] == [young.id] and inbox.unread == 1
        assert not (await impl.read_state("ttl", old.id)).retained
        assert [orjson.loads(f)["id"] for f in await impl.latest("u:ttl", None, 10)] == [young.id]
    finally:
        await impl.stop()


async def test_a_background_task_that_fails_is_restarted_counted_and_logged_once(redis_server, caplog):
    """The presence writer meets an unexpected error (here the topic rules it asks for raise, twice
    in a row): it is restarted with backoff, counted in notify_broker_task_restarts_total, logged
    once for the episode, and presence is written again, the batch it was holding included."""
    failures = {"left": 0}

    def rules(stream: str) -> StreamRules:
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("rules unavailable")
        return StreamRules()

    settings = Settings(
        jwt_secret=SECRET,
        redis_url=redis_server.url,
        redis_prefix=f"s{uuid.uuid4().hex[:8]}",  # type: ignore[arg-type]
        probe_interval_seconds=0.2,
    )
    metrics = Metrics("r")
    impl = create_broker(settings, "r", metrics, rules)

    async def on_lost() -> None:
        return None

    await impl.start(lambda *_: None, on_lost)
    try:
        await eventually(lambda: impl.ready, 5.0)
        caplog.set_level("DEBUG", logger="service.broker")
        failures["left"] = 2
        impl.set_presence("t:lobby", "ann", 1)  # written in the background, by the writer that fails
        await eventually(lambda: failures["left"] == 0, 5.0)
        impl.set_presence("u:bob", "bob", 1)

        async def online(stream: str) -> int | None:
            return (await impl.publish(stream, '"e"', "1", None)).online

        for _ in range(250):
            if await online("u:bob") == 1 and (await impl.members("t:lobby", 10))[1] == 1:
                break
            await asyncio.sleep(0.02)
        assert await online("u:bob") == 1
        assert await impl.members("t:lobby", 10) == (["ann"], 1)
        restarts = metrics.registry.get_sample_value("notify_broker_task_restarts_total", {"task": "redis-presence"})
        assert restarts == 2
        logged = [r for r in caplog.records if r.levelname == "ERROR" and "redis-presence" in r.getMessage()]
        assert len(logged) == 1
    finally:
        await impl.stop()


def test_pipeline_send_hands_each_reply_to_its_callback_and_one_that_raises_harms_no_other(redis_server):
    """`AutoPipeline.send`: each command's reply (or error reply) reaches its callback in order, mixed
    with awaited commands; a callback that raises is logged and the connection and the replies after
    it carry on; with no connection made yet, or with replicas to wait for, nothing is sent (False)."""
    import redis.asyncio as aioredis
    import uvloop
    from redis.exceptions import ResponseError

    from service.broker.redis.pipeline import AutoPipeline
    from service.broker.redis.resp import command

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        pipeline = AutoPipeline(client, deadline=5.0)
        got: list[object] = []

        def keep(reply: object, failure: BaseException | None) -> None:
            got.append(failure if failure is not None else reply)

        def explode(reply: object, failure: BaseException | None) -> None:
            raise RuntimeError("a callback's bug")

        try:
            assert not pipeline.send(command("ECHO", "early"), keep)  # not connected yet
            assert await pipeline.execute(command("ECHO", "connect")) == "connect"
            assert pipeline.send(command("ECHO", "a"), keep)
            assert pipeline.send(command("ECHO", "b"), explode)
            assert pipeline.send(command("NOSUCHCOMMAND"), keep)
            assert await pipeline.execute(command("ECHO", "awaited")) == "awaited"
            assert pipeline.send(command("ECHO", "c"), keep)
            assert await pipeline.execute(command("PING")) == "PONG"
            assert got[0] == "a" and got[2] == "c"
            assert isinstance(got[1], ResponseError) and "unknown command" in str(got[1])
            assert len(got) == 3
            acked = AutoPipeline(client, deadline=5.0, replicas=1)
            await acked.execute(command("PING"))
            assert not acked.send(command("ECHO", "x"), keep)  # its WAIT is awaited by `execute`
            await acked.aclose()
        finally:
            await pipeline.aclose()
            await client.aclose()

    uvloop.run(scenario())
