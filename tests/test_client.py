"""service.client against real replicas and a real Redis; the CLI as a user runs it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import orjson
import pytest

from service.client import (
    BatchItem,
    Disconnected,
    Listener,
    ListenerError,
    Notification,
    Publisher,
    PublishError,
    TopicRefused,
    Unauthorized,
    listen,
)

from .utils import ROOT, SECRET, TIMEOUT, RedisServer, Replica, cluster_env, free_port, token

PUBLISHER = token("backend", "notify:publish notify:read")
ADMIN = token("moderator", "notify:admin")
NAMESPACES = json.dumps(
    {
        "chat": {"join": "any", "publish": True, "signals": True, "presence": True, "join_leave": True},
        "room": {"join": "token", "publish": True},
    }
)


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


@pytest.mark.parametrize(
    "statement",
    [
        "from service.client.listener import Listener",
        "from service.client.streams import StreamCursors",
        "from service.client.topics import TopicMembership",
    ],
)
def test_listener_modules_import_first_in_a_fresh_interpreter(statement: str) -> None:
    """An import cycle between the client modules breaks only the module imported first, and this
    file imports service.client before anything else, so only a fresh interpreter can see one."""
    done = subprocess.run(
        [sys.executable, "-c", statement], capture_output=True, text=True, timeout=3 * TIMEOUT, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
async def test_listener_resumes_across_a_replica_restart_without_loss_or_duplicates(own_redis):
    """The listener's replica restarts while a backend keeps publishing through another replica: the
    listener reconnects with since= and broadcast_since= and gets every notification once, in order
    within each stream (frames of two streams may interleave)."""
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
            assert [n.id for n in received if n.stream == "user"] == sent[:10] + sent[11:]
            assert [n.id for n in received if n.stream == "broadcast"] == [sent[10]]
            assert sorted(n.data for n in received) == list(range(30))
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
        broadcasts = [(await pub.broadcast("b", i)).id for i in range(2)]
    listener = listen(single.url, token("cl-lou"), since=ids[0], broadcast_since=broadcasts[0])
    got = await take(listener, 3)
    assert sorted(n.id for n in got if n.stream == "user") == [ids[1], ids[2]]
    assert [n.id for n in got if n.stream == "broadcast"] == [broadcasts[1]]
    # Frames at or behind their own stream's cursor are dropped, whatever the server sends.
    assert listener._cursors.accept({"type": "notification", "id": ids[2], "event": "e", "data": 1, "ts": 1}) is None
    assert listener.last_id == ids[2] and listener.last_broadcast_id == broadcasts[1]
    url = listener._connect_url(single.ws_url)
    assert f"since={ids[2]}" in url and f"broadcast_since={broadcasts[1]}" in url
    # Ids are per stream: an id equal to one of another stream is another notification.
    same = {"type": "notification", "id": "9999999999999-1", "event": "e", "data": None, "ts": 1}
    assert listener._cursors.accept(same) is not None
    assert listener._cursors.accept({**same, "broadcast": True}) is not None
    assert listener._cursors.accept(same) is None and listener._cursors.accept({**same, "broadcast": True}) is None
    assert (listener.last_id, listener.last_broadcast_id) == ("9999999999999-1", "9999999999999-1")


async def test_listener_keeps_one_cursor_per_stream_from_the_welcome(single):
    """A fresh listener takes each stream's cursor from the welcome, never one stream's id for the other."""
    user = f"cl-cur-{uuid.uuid4().hex[:6]}"
    listener = listen(single.ws_url, token(user))
    assert listener._connect_url(single.ws_url) == single.ws_url  # nothing seen: no cursor at all
    async with running(listener) as received, publisher(single) as pub:
        await until(lambda: listener.state == "open")
        assert listener.last_id is not None and listener.last_broadcast_id is not None
        broadcast = await pub.broadcast("b")
        await until(lambda: len(received) == 1)
        user_cursor = listener.last_id
        assert listener.last_broadcast_id == broadcast.id and user_cursor != broadcast.id
        url = listener._connect_url(single.ws_url)
        assert f"since={user_cursor}" in url and f"broadcast_since={broadcast.id}" in url
    only_user = listen(single.ws_url, token(user), since=user_cursor)._connect_url(single.ws_url)
    assert parse_qs(urlsplit(only_user).query) == {"since": [user_cursor]}
    only_broadcast = listen(single.ws_url, token(user), broadcast_since=broadcast.id)._connect_url(single.ws_url)
    assert parse_qs(urlsplit(only_broadcast).query) == {"broadcast_since": [broadcast.id]}


async def test_listener_stops_on_4403_and_does_not_reconnect(single):
    """POST /users/{user}/disconnect closes with 4403: the listener stops at once, without asking the
    token callable again, and keeps its cursors for whoever decides to start again."""
    user = f"cl-ban-{uuid.uuid4().hex[:6]}"
    calls: list[int] = []

    def current() -> str:
        calls.append(1)
        return token(user)

    listener = listen(single.ws_url, current, backoff_base=0.01)
    bystander = listen(single.ws_url, token(f"{user}-other"))
    got: list[Notification] = []

    async def consume() -> None:
        async for notification in listener:
            got.append(notification)

    task = asyncio.create_task(consume())
    try:
        async with publisher(single) as pub, running(bystander):
            await until(lambda: listener.state == "open" and bystander.state == "open")
            accepted = await pub.notify(user, "e")
            await until(lambda: len(got) == 1)
            answer = await pub._http.post(
                f"{single.url}/users/{user}/disconnect", headers={"Authorization": f"Bearer {ADMIN}"}
            )
            assert answer.status_code == 202, answer.text
            with pytest.raises(Disconnected, match="4403") as stopped:
                await asyncio.wait_for(task, 2 * TIMEOUT)
            assert stopped.value.code == 4403 and isinstance(stopped.value, Unauthorized)
            assert listener.state == "closed" and listener.reconnects == 0 and len(calls) == 1
            assert listener.last_id == accepted.id
            await asyncio.sleep(0.2)
            assert bystander.state == "open" and bystander.reconnects == 0  # only that user's sockets
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ListenerError):
            await task


# ---- topics


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def topic_single() -> Any:
    """One replica on the embedded broker with topic namespaces configured."""
    replica = Replica({"NOTIFY_TOPICS": NAMESPACES}).start()
    yield replica
    replica.stop()


async def test_publish_topic_reaches_a_listener_once(topic_single):
    lobby, user = f"chat:{uid('lobby')}", uid("cl-top")
    listener = listen(topic_single.ws_url, token(user), topics=[lobby])
    async with running(listener) as received, publisher(topic_single) as pub:
        await until(lambda: lobby in listener.joined)
        first = await pub.publish_topic(lobby, "msg", {"text": "hi"})
        assert first.members == 1 and not first.duplicate and first.idempotency_key
        again = await pub.publish_topic(lobby, "msg", {"text": "hi"}, idempotency_key=first.idempotency_key)
        assert again.duplicate and again.id == first.id
        await until(lambda: len(received) == 1)
        await asyncio.sleep(0.3)
        with pytest.raises(PublishError) as unknown:
            await pub.publish_topic("nowhere:x", "e")
        assert unknown.value.status == 404
        with pytest.raises(PublishError) as invalid:
            await pub.publish_topic("has space", "e")
        assert invalid.value.status == 422
    [message] = received
    assert (message.id, message.topic, message.stream, message.sender) == (first.id, lobby, f"topic:{lobby}", None)
    assert (message.event, message.data) == ("msg", {"text": "hi"})
    assert listener.last_topic_ids[lobby] == first.id


async def test_publish_topic_retry_after_a_lost_answer_does_not_deliver_twice(topic_single):
    lobby = f"chat:{uid('lost')}"
    listener = listen(topic_single.ws_url, token(uid("cl-top")), topics=[lobby])
    async with running(listener) as received, answer_lost_once(topic_single.port) as url:
        await until(lambda: lobby in listener.joined)
        async with Publisher(url, PUBLISHER, backoff_base=0.01) as pub:
            accepted = await pub.publish_topic(lobby, "once", 1)
        assert accepted.attempts == 2 and accepted.duplicate
        await until(lambda: len(received) == 1)
        await asyncio.sleep(0.3)
    assert [n.id for n in received] == [accepted.id]


async def test_listener_topic_permissions_and_removal(topic_single):
    room, user = f"room:{uid('r')}", uid("cl-top")
    with pytest.raises(TopicRefused) as refused:
        await take(listen(topic_single.ws_url, token(user), topics=[room]), 1, within=TIMEOUT)
    assert (refused.value.topic, refused.value.error) == (room, "forbidden")

    listener = listen(topic_single.ws_url, token(user), topics=[room], topic_tokens={room: token(user, topic=room)})
    async with running(listener) as received, publisher(topic_single) as pub:
        await until(lambda: room in listener.joined)
        first = await pub.publish_topic(room, "e", 1)
        await until(lambda: len(received) == 1)
        removal = await pub._http.delete(
            f"{topic_single.url}/topics/{room}/members/{user}", headers={"Authorization": f"Bearer {ADMIN}"}
        )
        assert removal.status_code == 202, removal.text
        await until(lambda: listener.topics == [])
        await pub.publish_topic(room, "e", 2)
        await asyncio.sleep(0.3)
    assert [n.id for n in received] == [first.id] and room not in listener.last_topic_ids


@pytest.mark.slow
async def test_listener_resumes_topics_across_a_replica_switch(redis_server):
    """The listener's replica freezes, then dies, while a backend publishes through another one to
    the user, to everyone and to two topics: the listener moves on, resumes each stream from its own
    cursor (the topics by joining again with since), and gets everything once, in order per stream."""
    env = cluster_env(redis_server, NOTIFY_TOPICS=NAMESPACES, NOTIFY_DRAIN_SECONDS="0.2")
    a, b = Replica(env).start(), Replica(env).start()
    lobby, other, user = f"chat:{uid('lobby')}", f"chat:{uid('other')}", uid("cl-move")
    sent: dict[str, list[str]] = {"user": [], "broadcast": [], f"topic:{lobby}": [], f"topic:{other}": []}
    try:
        async with publisher(b) as pub:

            async def publish_round(n: int) -> None:
                sent["user"].append((await pub.notify(user, "e", n)).id)
                sent["broadcast"].append((await pub.broadcast("b", n)).id)
                sent[f"topic:{lobby}"].append((await pub.publish_topic(lobby, "m", n)).id)
                sent[f"topic:{other}"].append((await pub.publish_topic(other, "m", n)).id)

            listener = listen(
                [a.ws_url, b.ws_url], token(user), topics=[lobby, other], backoff_base=0.1, backoff_max=0.3
            )
            async with running(listener) as received:
                await until(lambda: listener.state == "open" and listener.joined == {lobby, other})
                for n in range(5):
                    await publish_round(n)
                await until(lambda: len(received) == 20)
                # Frozen, `a` delivers nothing of what follows; killed, it never will: only the
                # replay on `b` from each stream's own cursor can bring these.
                assert a.proc is not None
                a.proc.send_signal(signal.SIGSTOP)
                try:
                    for n in range(5, 10):
                        await publish_round(n)
                finally:
                    a.proc.kill()
                    a.proc.wait(TIMEOUT)
                await until(lambda: len(received) == 40)
                assert listener.url == b.ws_url and listener.joined == {lobby, other}
                for n in range(10, 15):
                    await publish_round(n)
                await until(lambda: len(received) >= 60)
                await asyncio.sleep(0.3)
            by_stream: dict[str, list[str]] = {}
            for notification in received:
                by_stream.setdefault(notification.stream, []).append(notification.id)
            assert by_stream == sent
            assert listener.reconnects == 1 and listener.topic_gaps == 0
            assert listener.last_topic_ids == {lobby: sent[f"topic:{lobby}"][-1], other: sent[f"topic:{other}"][-1]}
    finally:
        a.stop()
        b.stop()


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
        # `--since` resumes the user's stream only; a broadcast is seen live, so wait until the
        # listener has printed the first notification (it is connected then) before sending one.
        assert listener.stdout is not None
        ready, _, _ = select.select([listener.stdout], [], [], 3 * TIMEOUT)
        assert ready, "the listener printed nothing"
        head = listener.stdout.readline()
        second = orjson.loads(cli("broadcast", "hello", "[1,2]", "--url", single.url).stdout)
        out, err = listener.communicate(timeout=3 * TIMEOUT)
        out = head + out
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
