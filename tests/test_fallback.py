"""`fallback` on a user's notification: `notification.undelivered` when nobody was online,
`notification.unread` when it is still unread N seconds later, cancelled by a read on any replica,
decided by whichever replica is alive. Real replicas, real Redis (one, and a Cluster), a real
receiver verifying every request with the `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson

from .receiver import Received, Receiver, receiving
from .test_httpprotocol import post, responses
from .test_webhooks import env
from .topology import ClusterTopology
from .utils import TIMEOUT, Client, Replica, cluster_env, publisher_headers, started, token


def fallback_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return env(receiver, events=("notification.unread", "notification.undelivered"), **extra)


def uid() -> str:
    return f"f{uuid.uuid4().hex[:10]}"


async def notify(http: httpx.AsyncClient, replica: Replica, user: str, **fallback: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"event": "msg", "data": {"n": uid()}}
    if fallback:
        body["fallback"] = fallback
    answer = await http.post(f"{replica.url}/notify/{user}", json=body, headers=publisher_headers())
    assert answer.status_code == 202, answer.text
    return {**answer.json(), "event": "msg", "data": body["data"]}


async def fallback_state(http: httpx.AsyncClient, replica: Replica, user: str, notification_id: str) -> str:
    answer = await http.get(f"{replica.url}/notifications/{notification_id}?user={user}", headers=publisher_headers())
    assert answer.status_code == 200, answer.text
    return answer.json()["fallback"]


async def until_state(http: httpx.AsyncClient, replica: Replica, user: str, notification_id: str, want: str) -> None:
    deadline = time.monotonic() + 3 * TIMEOUT
    while (found := await fallback_state(http, replica, user, notification_id)) != want:
        assert time.monotonic() < deadline, f"fallback of {notification_id} stayed {found!r}, never {want!r}"
        await asyncio.sleep(0.1)


def told(received: list[Received], event_type: str) -> list[dict[str, Any]]:
    return [r.event["data"] for r in received if r.event["type"] == event_type]


def expected(user: str, sent: dict[str, Any]) -> dict[str, Any]:
    return {"user": user, "id": sent["id"], "event": sent["event"], "data": sent["data"], "ts": sent["ts"]}


async def online(replica: Replica, user: str) -> Client:
    client = await Client.connect(replica, user)
    await client.welcome()
    return client


async def offline_and_unread(http: httpx.AsyncClient, a: Replica, b: Replica, receiver: Receiver) -> None:
    """What every mode must do, with the user's socket on `b` and every publish on `a`:
    `offline` is sent for an offline user and not for an online one; `unread` is sent for what is
    left unread and cancelled by an `ack` frame on `b`; GET /notifications/{id} tells each state."""
    away, here = uid(), uid()
    socket = await online(b, here)
    gone = await notify(http, a, away, when="offline", after_seconds=5)  # after_seconds: ignored here
    seen = await notify(http, a, here, when="offline")
    assert gone["online"] == 0 and seen["online"] == 1
    got = await receiver.wait_for(lambda r: told(r, "notification.undelivered") != [])
    assert told(got, "notification.undelivered") == [expected(away, gone)]
    assert await fallback_state(http, a, away, gone["id"]) == "sent"
    assert await fallback_state(http, b, here, seen["id"]) == "none"

    read = await notify(http, a, here, when="unread", after_seconds=2)
    left = await notify(http, a, here, when="unread", after_seconds=2)
    plain = await notify(http, a, here)
    assert await fallback_state(http, b, here, left["id"]) == "pending"
    await socket.notifications(3)
    await socket.send({"type": "ack", "id": read["id"]})
    await until_state(http, a, here, read["id"], "cancelled")  # read before it was due
    got = await receiver.wait_for(lambda r: told(r, "notification.unread") != [])
    assert told(got, "notification.unread") == [expected(here, left)]
    await until_state(http, b, here, left["id"], "sent")
    assert await fallback_state(http, a, here, read["id"]) == "cancelled"
    assert await fallback_state(http, a, here, plain["id"]) == "none"
    await asyncio.sleep(1.0)  # the cancelled one is past due: still nothing more
    assert len(receiver.events("notification.unread")) == 1 and len(receiver.events("notification.undelivered")) == 1
    assert receiver.unverified == 0
    await socket.close()


async def test_offline_and_unread_across_two_replicas(redis_server, http):
    with receiving() as receiver:
        config = cluster_env(redis_server, **fallback_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            await offline_and_unread(http, a, b, receiver)


async def test_embedded_offline_unread_and_a_read_over_rest(http):
    """The embedded broker keeps the checks in process, with the same outcomes; a read through
    POST /me/notifications/read cancels as an `ack` does."""
    with receiving() as receiver, started(Replica(fallback_env(receiver))) as (replica,):
        await offline_and_unread(http, replica, replica, receiver)
        user = uid()
        sent = await notify(http, replica, user, when="unread", after_seconds=1)
        marked = await http.post(
            replica.url + "/me/notifications/read",
            json={"up_to": sent["id"]},
            headers={"Authorization": f"Bearer {token(user)}"},
        )
        assert marked.status_code == 200
        await asyncio.sleep(2.0)
        assert await fallback_state(http, replica, user, sent["id"]) == "cancelled"
        assert user not in {d["user"] for d in told(receiver.events(), "notification.unread")}


async def test_unread_fires_after_the_publishing_replica_was_killed(redis_server, http):
    """The pending check lives in Redis: SIGKILL the replica that took the publish, and the other
    sends `notification.unread` once, when it is due."""
    with receiving() as receiver:
        config = cluster_env(redis_server, **fallback_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            user = uid()
            sent = await notify(http, a, user, when="unread", after_seconds=2)
            a.signal(9)
            got = await receiver.wait_for(lambda r: told(r, "notification.unread") != [])
            assert told(got, "notification.unread") == [expected(user, sent)]
            assert await fallback_state(http, b, user, sent["id"]) == "sent"
            await asyncio.sleep(1.0)
            assert len(receiver.events("notification.unread")) == 1


async def test_batch_items_and_both_publish_paths(redis_server, http):
    """Batch items take a fallback too; the publish fast path and the framework take the same bodies
    and refuse the same ones with 422 saying what was wrong (pipelined on one raw connection)."""
    with receiving() as receiver:
        config = cluster_env(redis_server, **fallback_env(receiver))
        with started(Replica(config)) as (replica,):
            user = uid()
            batch = await http.post(
                replica.url + "/notify",
                json=[
                    {"user": user, "event": "a", "fallback": {"when": "offline"}},
                    {"user": user, "event": "b"},
                ],
                headers=publisher_headers(),
            )
            assert batch.status_code == 200 and [r["status"] for r in batch.json()["results"]] == [202, 202]
            got = await receiver.wait_for(lambda r: told(r, "notification.undelivered") != [])
            first = batch.json()["results"][0]
            assert [(d["id"], d["event"]) for d in told(got, "notification.undelivered")] == [(first["id"], "a")]

            on_topic = [{"topic": "chat:x", "event": "a", "fallback": {"when": "offline"}}]
            refused = await http.post(replica.url + "/notify", json=on_topic, headers=publisher_headers())
            assert refused.status_code == 422 and "fallback" in refused.text

            good = {"event": "e", "fallback": {"when": "unread", "after_seconds": 604800}}
            bad = [
                {"event": "e", "fallback": {"when": "later"}},
                {"event": "e", "fallback": {"when": "unread", "after_seconds": -1}},
                {"event": "e", "fallback": {"when": "unread", "after_seconds": 604801}},
                {"event": "e", "fallback": {"when": "unread", "after_seconds": 1.5}},
                {"event": "e", "fallback": {"when": "unread", "after_seconds": "60"}},
                {"event": "e", "fallback": {"when": "unread", "then": 1}},
                {"event": "e", "fallback": "unread"},
            ]
            reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
            raw = post(f"/notify/{user}", orjson.dumps(good))
            raw += b"".join(post(f"/notify/{user}", orjson.dumps(body)) for body in bad)
            raw += post("/broadcast", orjson.dumps(good)) + post("/topics/chat:x", orjson.dumps(good))
            writer.write(raw)
            answers = await responses(reader, 2 + len(bad) + 1)
            writer.close()
            assert answers[0][0] == 202
            assert orjson.loads(answers[0][2])["online"] == 0
            for status, _, body in answers[1:]:
                error = orjson.loads(body)
                assert status == 422 and error["error"] == "invalid_request", error
                assert "fallback" in error["message"] + orjson.dumps(error.get("details")).decode(), error
            assert await fallback_state(http, replica, user, orjson.loads(answers[0][2])["id"]) == "pending"


async def test_on_a_redis_cluster(http):
    """A Redis Cluster: the same outcomes, from checks spread over more than one primary."""
    with ClusterTopology() as cluster, receiving() as receiver:
        config = cluster.env(**fallback_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            await offline_and_unread(http, a, b, receiver)
            users = [uid() for _ in range(16)]
            for user in users:
                await notify(http, a, user, when="unread", after_seconds=0)
            await receiver.wait_for(lambda r: {d["user"] for d in told(r, "notification.unread")} >= set(users))
            prefix = config["NOTIFY_REDIS_PREFIX"]
            holders = {cluster.owner(f"{prefix}:{{fc{shard}}}:due").port for shard in range(8)}
            assert len(holders) > 1
