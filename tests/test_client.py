"""service.client against real replicas and a real Redis; the CLI as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jwt
import orjson
import pytest

from service.client import (
    BatchItem,
    Listener,
    ListenerError,
    Notification,
    Publisher,
    PublishError,
    Unauthorized,
    listen,
)

from .utils import ROOT, SECRET, TIMEOUT, RedisServer, Replica, cluster_env, free_port, token

PUBLISHER = token("backend", "notify:publish notify:read")


def publisher(replica: Replica, **options: Any) -> Publisher:
    return Publisher(replica.url, PUBLISHER, **options)


async def take(listener: Listener, count: int, within: float = 4 * TIMEOUT) -> list[Notification]:
    """The next `count` notifications (bounded in time); the listener stays usable."""
    got: list[Notification] = []
    iterator = listener.__aiter__()
    async with asyncio.timeout(within):
        while len(got) < count:
            got.append(await anext(iterator))
    await iterator.aclose()  # type: ignore[attr-defined]
    return got


@contextlib.asynccontextmanager
async def running(listener: Listener) -> AsyncIterator[list[Notification]]:
    """Consume a listener in the background into a list; stopped on exit."""
    received: list[Notification] = []

    async def consume() -> None:
        async for notification in listener:
            received.append(notification)

    task = asyncio.create_task(consume())
    try:
        yield received
    finally:
        await listener.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ListenerError):
            await task


async def until(predicate: Any, within: float = 4 * TIMEOUT) -> None:
    """Poll a condition on state another task changes (bounded in time)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110 - the state has no event to wait on
            await asyncio.sleep(0.02)


# ---- publisher


async def test_notify_broadcast_and_batch(single):
    async with publisher(single) as pub:
        listener = listen(single.ws_url, token("cl-alice"))
        async with running(listener) as received:
            await until(lambda: listener.state == "open")
            accepted = await pub.notify("cl-alice", "order.shipped", {"n": 1})
            assert accepted.online == 1 and not accepted.duplicate and accepted.attempts == 1
            assert accepted.idempotency_key  # generated, so a retry could never deliver twice
            everyone = await pub.broadcast("maintenance", None)
            results = await pub.notify_many([BatchItem("cl-alice", "a", [1]), {"user": "cl-alice", "event": "b"}])
            assert [r.status for r in results] == [202, 202] and all(r.ok and r.id for r in results)
            await until(lambda: len(received) == 4)
        assert [n.id for n in received] == [accepted.id, everyone.id, results[0].id, results[1].id]
        assert received[0].event == "order.shipped" and received[0].data == {"n": 1} and not received[0].broadcast
        assert received[1].broadcast and received[1].data is None
        assert listener.last_id == results[1].id and listener.last_broadcast_id == everyone.id


async def test_same_idempotency_key_answers_the_first_result(single):
    key = f"order-{uuid.uuid4().hex}"  # the session's replica is shared: keys must not collide with other tests
    async with publisher(single) as pub:
        first = await pub.notify("cl-carol", "e", 1, idempotency_key=key)
        again = await pub.notify("cl-carol", "e", 1, idempotency_key=key)
    assert again.duplicate and again.id == first.id and not first.duplicate


async def test_client_errors_raise_with_the_servers_json_error(single):
    async with publisher(single) as pub:
        with pytest.raises(PublishError) as invalid:
            await pub.notify("has space", "e")
        assert invalid.value.status == 422 and invalid.value.error == "invalid_request" and invalid.value.details
        with pytest.raises(PublishError) as unauthorized:
            await Publisher(single.url, token("backend", "notify:publish", ttl=-60)).notify("x", "e")
        assert (unauthorized.value.status, unauthorized.value.error) == (401, "invalid_token")
        assert "expired" in unauthorized.value.message
        with pytest.raises(PublishError) as forbidden:
            await Publisher(single.url, token("cl-alice")).broadcast("e")
        assert (forbidden.value.status, forbidden.value.error) == (403, "missing_scope")
        results = await pub.notify_many([BatchItem("ok", "e"), BatchItem("ok", "e", "x" * 70_000)])
        assert results[0].ok and (results[1].status, results[1].error) == (413, "payload_too_large")
        with pytest.raises(PublishError) as whole_batch:
            await pub.notify_many([BatchItem("ok", "x" * 200)])
        assert whole_batch.value.status == 422


async def test_connection_errors_are_retried_then_raised():
    pub = Publisher(f"http://127.0.0.1:{free_port()}", PUBLISHER, max_attempts=3, backoff_base=0.01)
    started = time.monotonic()
    with pytest.raises(PublishError) as failed:
        await pub.notify("x", "e")
    await pub.aclose()
    assert failed.value.status is None and failed.value.error == "connection_error"
    assert time.monotonic() - started < TIMEOUT


async def test_token_callable_is_called_per_request(single):
    calls = []

    async def current() -> str:
        calls.append(1)
        return PUBLISHER

    async with Publisher(single.url, current) as pub:
        await pub.notify("cl-dave", "e")
        await pub.broadcast("e")
    assert len(calls) == 2


@pytest.fixture
def own_redis() -> Any:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


async def inbox(pub: Publisher, user: str) -> list[dict[str, Any]]:
    response = await pub._http.get(
        f"{pub.base_url}/users/{user}/notifications", headers={"Authorization": f"Bearer {PUBLISHER}"}
    )
    assert response.status_code == 200, response.text
    return list(response.json()["notifications"])


@pytest.mark.slow
async def test_publish_while_redis_is_down_is_retried_and_delivered_once(own_redis):
    """Redis stops: every try answers 503 until it is back; then one notification, delivered once."""
    replica = Replica(
        cluster_env(own_redis, NOTIFY_PUBLISH_TIMEOUT_SECONDS="0.5", NOTIFY_RECONNECT_MAX_SECONDS="0.5")
    ).start()
    try:
        async with publisher(replica, max_attempts=30, backoff_base=0.05, backoff_max=0.4) as pub:
            listener = listen(replica.ws_url, token("cl-erin"))
            async with running(listener) as received:
                await until(lambda: listener.state == "open")
                own_redis.kill()
                sending = asyncio.create_task(pub.notify("cl-erin", "during.outage", {"n": 1}))
                await asyncio.sleep(1.5)
                assert not sending.done()
                own_redis.start()
                accepted = await asyncio.wait_for(sending, 4 * TIMEOUT)
                assert accepted.attempts > 1 and not accepted.duplicate
                # The listener gets it live, or (the replica saw Redis lose its data) by refetching after resync.
                await until(lambda: any(n.id == accepted.id for n in received))
                await asyncio.sleep(0.5)
            assert [n.id for n in received] == [accepted.id]
            assert [n["id"] for n in await inbox(pub, "cl-erin")] == [accepted.id]
    finally:
        replica.stop()


@pytest.mark.slow
async def test_publish_while_redis_hangs_is_stored_once(own_redis):
    """Redis hangs: tries time out (503) until it wakes up; whether or not Redis ran a timed-out try
    after all, the retries reuse its Idempotency-Key and exactly one notification is stored."""
    replica = Replica(cluster_env(own_redis, NOTIFY_PUBLISH_TIMEOUT_SECONDS="0.5")).start()
    try:
        async with publisher(replica, max_attempts=30, backoff_base=0.3, backoff_max=0.6) as pub:
            own_redis.pause()
            try:
                sending = asyncio.create_task(pub.notify("cl-frank", "during.hang", {"n": 2}))
                await asyncio.sleep(0.8)  # the first try has timed out by now
            finally:
                own_redis.resume()
            accepted = await asyncio.wait_for(sending, 4 * TIMEOUT)
            assert accepted.attempts > 1
            stored = await inbox(pub, "cl-frank")
            assert [n["id"] for n in stored] == [accepted.id], stored
    finally:
        replica.stop()


@contextlib.asynccontextmanager
async def answer_lost_once(target_port: int) -> AsyncIterator[str]:
    """A loopback TCP proxy whose first connection delivers the request but loses the answer, as a
    network failure after the server acted would. Later connections pass through."""
    connections = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        if connections == 1:
            forward = asyncio.create_task(pipe(reader, up_writer))
            await up_reader.read(1)  # the server answered, so it acted: drop the answer and the connection
            forward.cancel()
            writer.transport.abort()
            up_writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def test_retry_after_a_lost_answer_does_not_deliver_twice(single):
    """The first try is published but its answer is lost; the retry carries the same Idempotency-Key,
    so the server answers the first result and the user gets one notification, not two."""
    listener = listen(single.ws_url, token("cl-gus"))
    async with running(listener) as received, answer_lost_once(single.port) as url:
        await until(lambda: listener.state == "open")
        async with Publisher(url, PUBLISHER, backoff_base=0.01) as pub:
            accepted = await pub.notify("cl-gus", "once", {"n": 3})
        assert accepted.attempts == 2 and accepted.duplicate
        await until(lambda: len(received) == 1)
        await asyncio.sleep(0.3)
    assert [n.id for n in received] == [accepted.id]
    async with publisher(single) as pub:
        assert [n["id"] for n in await inbox(pub, "cl-gus")] == [accepted.id]


# ---- listener


@pytest.mark.slow
async def test_listener_resumes_across_a_replica_restart_without_loss_or_duplicates(own_redis):
    """The listener's replica restarts while a backend keeps publishing through another replica: the
    listener reconnects with since= and gets every notification once, in order."""
    env = cluster_env(own_redis, NOTIFY_DRAIN_SECONDS="0.2")
    a, b = Replica(env).start(), Replica(env).start()
    try:
        async with publisher(b) as pub:
            listener = listen(a.ws_url, token("cl-gina"), backoff_base=0.1, backoff_max=0.5)
            async with running(listener) as received:
                await until(lambda: listener.state == "open")
                sent = [(await pub.notify("cl-gina", "e", i)).id for i in range(10)]
                await until(lambda: len(received) == 10)
                a.stop()  # drains: the socket is closed with 1012
                sent.append((await pub.broadcast("while.down", 10)).id)
                sent += [(await pub.notify("cl-gina", "e", i)).id for i in range(11, 20)]
                await asyncio.sleep(0.3)
                a = Replica(env, port=a.port).start()
                sent += [(await pub.notify("cl-gina", "e", i)).id for i in range(20, 30)]
                await until(lambda: len(received) >= 30)
                await asyncio.sleep(0.3)
            assert [n.id for n in received] == sent
            assert [n.data for n in received] == list(range(30))
            assert listener.reconnects >= 1
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
async def test_listener_rotates_urls_when_its_replica_goes_away(own_redis):
    env = cluster_env(own_redis, NOTIFY_DRAIN_SECONDS="0.2")
    a, b = Replica(env).start(), Replica(env).start()
    try:
        async with publisher(b) as pub:
            listener = listen([a.ws_url, b.url], token("cl-hank"), backoff_base=0.05, backoff_max=0.2)
            async with running(listener) as received:
                await until(lambda: listener.state == "open")
                assert listener.url == a.ws_url
                first = await pub.notify("cl-hank", "e", 1)
                await until(lambda: len(received) == 1)
                a.stop()
                second = await pub.notify("cl-hank", "e", 2)
                await until(lambda: len(received) == 2)
                assert listener.url == b.ws_url
            assert [n.id for n in received] == [first.id, second.id]
    finally:
        a.stop()
        b.stop()


async def test_listener_stops_on_4401_without_a_new_token(single):
    with pytest.raises(Unauthorized, match="4401"):
        await take(listen(single.ws_url, token("cl-ivy", ttl=-10)), 1, within=TIMEOUT)
    stale = token("cl-ivy", ttl=-10)
    calls: list[int] = []

    def same_token() -> str:
        calls.append(1)
        return stale

    with pytest.raises(Unauthorized, match="no new token"):
        await take(listen(single.ws_url, same_token), 1, within=TIMEOUT)
    assert len(calls) == 2  # once to connect, once after 4401


async def test_listener_retries_4401_with_a_new_token_from_the_callable(single):
    tokens = iter([token("cl-jack", ttl=-10), token("cl-jack")])
    listener = listen(single.ws_url, lambda: next(tokens), backoff_base=0.01)
    async with running(listener) as received, publisher(single) as pub:
        await until(lambda: listener.state == "open")
        accepted = await pub.notify("cl-jack", "e")
        await until(lambda: len(received) == 1)
    assert received[0].id == accepted.id and listener.reconnects == 1


@pytest.mark.slow
async def test_listener_refreshes_the_token_before_it_expires(single):
    """With a token callable, the socket outlives the first token's exp without reconnecting."""
    calls: list[int] = []

    async def short_lived() -> str:
        calls.append(1)
        return token("cl-kim", ttl=3)

    listener = listen(single.ws_url, short_lived, refresh_margin=1.0)
    async with running(listener) as received, publisher(single) as pub:
        await until(lambda: listener.state == "open")
        await asyncio.sleep(3.5)
        accepted = await pub.notify("cl-kim", "e")
        await until(lambda: len(received) == 1)
    assert received[0].id == accepted.id
    assert listener.reconnects == 0 and len(calls) >= 2  # connect, then at least one refresh


async def test_listener_resumes_from_given_cursors_and_drops_duplicates(single):
    async with publisher(single) as pub:
        ids = [(await pub.notify("cl-lou", "e", i)).id for i in range(3)]
        broadcast = await pub.broadcast("b")
    listener = listen(single.url, token("cl-lou"), since=ids[0], broadcast_since=ids[0])
    got = await take(listener, 3)
    assert [n.id for n in got] == [ids[1], ids[2], broadcast.id]
    # Frames at or behind the cursors are dropped, whatever the server sends.
    assert listener._accept({"type": "notification", "id": ids[2], "event": "e", "data": 1, "ts": 1}) is None
    assert "since=" + ids[2] in listener._connect_url(single.ws_url)
    assert "broadcast_since=" + broadcast.id in listener._connect_url(single.ws_url)


# ---- command line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT,
        cwd=ROOT,
        env={**os.environ, "NOTIFY_JWT_SECRET": SECRET},
    )


def test_cli_token_and_send(single):
    done = cli("token", "--sub", "alice", "--scope", "notify:publish", "--ttl", "60")
    assert done.returncode == 0, done.stderr
    claims = jwt.decode(done.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["scope"] == "notify:publish" and claims["exp"] <= time.time() + 61

    sent = cli("send", "cl-mia", "order.shipped", '{"n":1}', "--url", single.url)
    assert sent.returncode == 0, sent.stderr
    answer = orjson.loads(sent.stdout)
    assert answer["id"] and answer["duplicate"] is False

    bad = cli("send", "cl-mia", "e", "{not json", "--url", single.url)
    assert bad.returncode == 2 and "not valid JSON" in bad.stderr
    refused = cli("send", "cl-mia", "e", "--url", single.url, "--token", token("cl-mia"))
    assert refused.returncode == 1 and "missing_scope" in refused.stderr


@pytest.mark.slow
def test_cli_listen_prints_json_lines(single):
    before = orjson.loads(cli("send", "cl-ned", "before", "--url", single.url).stdout)
    listener = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "listen",
            "--token",
            token("cl-ned"),
            "--url",
            single.ws_url,
            "--since",
            before["id"],
            "--count",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NOTIFY_JWT_SECRET": SECRET},
    )
    try:
        first = orjson.loads(cli("send", "cl-ned", "order.shipped", '{"n":1}', "--url", single.url).stdout)
        second = orjson.loads(cli("broadcast", "hello", "[1,2]", "--url", single.url).stdout)
        out, err = listener.communicate(timeout=3 * TIMEOUT)
    finally:
        if listener.poll() is None:
            listener.kill()
            listener.wait()
    assert listener.returncode == 0, err
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert lines == [
        {"type": "notification", "id": first["id"], "event": "order.shipped", "data": {"n": 1}, "ts": first["ts"]},
        {
            "type": "notification",
            "id": second["id"],
            "event": "hello",
            "data": [1, 2],
            "ts": second["ts"],
            "broadcast": True,
        },
    ]

    expired = cli("listen", "--token", token("cl-ned", ttl=-5), "--url", single.ws_url)
    assert expired.returncode == 1 and "4401" in expired.stderr
