"""Pushes go out when a notification's fallback fires: to every device of its user (each its own
outbox job), through real replicas sharing a real Redis, to a local push service that decrypts each
push with the subscription's keys and verifies its VAPID JWT, and to a local FCM v1 endpoint."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .pushkit import Google, PushService, Received, Subscription, public_of, service_account, vapid_pem
from .rawhttp import metric
from .topology import ClusterTopology
from .utils import Client, Replica, cluster_env, publisher_headers, started, token, until

SUBJECT = "mailto:ops@example.com"
PUSH = {"title": "Order shipped", "body": "Arrives Tuesday", "url": "https://shop.example.com/o/7", "tag": "o7"}


def uid() -> str:
    return f"p{uuid.uuid4().hex[:10]}"


@pytest.fixture
def push_service() -> Iterator[PushService]:
    with PushService().running() as service:
        yield service


@pytest.fixture
def google() -> Iterator[Google]:
    with Google().running() as server:
        yield server


@pytest.fixture
def env(push_service: PushService, google: Google, tmp_path: Path) -> dict[str, str]:
    google.account_key = service_account(tmp_path / "sa.json", google.token_uri)
    pem = vapid_pem()
    return {
        "NOTIFY_VAPID_PRIVATE_KEY": pem,
        "NOTIFY_VAPID_SUBJECT": SUBJECT,
        "NOTIFY_PUSH_ALLOWED_ORIGINS": push_service.origin,
        "NOTIFY_FCM_CREDENTIALS_FILE": str(tmp_path / "sa.json"),
        "NOTIFY_FCM_ENDPOINT": google.origin,
    }


class Phone:
    """A user's browser subscription, registered as a device through the API."""

    def __init__(self, service: PushService, user: str, name: str) -> None:
        self.user, self.name = user, name
        self.path = f"/push/{user}-{name}"
        self.subscription = Subscription(service.endpoint(f"{user}-{name}"))
        self.service = service

    async def register(self, http: httpx.AsyncClient, replica: Replica) -> None:
        body = {"kind": "webpush", "subscription": self.subscription.to_json()}
        answer = await http.put(f"{replica.url}/me/devices/{self.name}", json=body, headers=as_user(self.user))
        assert answer.status_code == 200, answer.text

    def got(self) -> list[dict[str, Any]]:
        """What the push service took for this device, decrypted."""
        return [self.subscription.decrypt(r.body) for r in list(self.service.accepted) if r.path == self.path]

    def requests(self) -> list[Received]:
        return [r for r in list(self.service.received) if r.path == self.path]


def as_user(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


async def notify(http: httpx.AsyncClient, replica: Replica, user: str, **extra: Any) -> dict[str, Any]:
    body = {"event": "order.shipped", "data": {"n": uid()}, **extra}
    answer = await http.post(f"{replica.url}/notify/{user}", json=body, headers=publisher_headers())
    assert answer.status_code == 202, answer.text
    return {**answer.json(), **body}


async def push_state(http: httpx.AsyncClient, replica: Replica, user: str, notification_id: str) -> dict[str, Any]:
    answer = await http.get(f"{replica.url}/notifications/{notification_id}?user={user}", headers=publisher_headers())
    assert answer.status_code == 200, answer.text
    return dict(answer.json()["push"])


async def until_push(http: httpx.AsyncClient, replica: Replica, user: str, sent: dict[str, Any], want: dict) -> None:
    async def reached() -> bool:
        return await push_state(http, replica, user, sent["id"]) == want

    await until(reached, what=f"push state {want}")


def shown(sent: dict[str, Any]) -> dict[str, Any]:
    """The payload a device decrypts for a notification sent with PUSH."""
    return {
        "id": sent["id"],
        "event": sent["event"],
        "ts": sent["ts"],
        "icon": None,
        "data": None,
        **PUSH,
    }


async def online(replica: Replica, user: str) -> Client:
    client = await Client.connect(replica, user)
    await client.welcome()
    return client


async def offline_unread_and_read(
    http: httpx.AsyncClient, a: Replica, b: Replica, env: dict[str, str], push_service: PushService
) -> None:
    """Publishes on `a`, sockets on `b`: the offline user's two devices each get the push once (and
    never the other user's devices); the online user's get nothing; `unread` after 2 s pushes what
    is still unread and not what was read on `b`; a read past a pushed notification sends the read
    push; GET /notifications/{id} tells the push state."""
    away, here = uid(), uid()
    phones = [Phone(push_service, away, "laptop"), Phone(push_service, away, "phone")]
    mine = Phone(push_service, here, "laptop")
    for phone in (*phones, mine):
        await phone.register(http, b)
    socket = await online(b, here)

    gone = await notify(http, a, away, push=PUSH)  # push alone: fallback offline
    seen = await notify(http, a, here, push=PUSH)
    assert gone["online"] == 0 and seen["online"] == 1
    await until(lambda: all(phone.got() for phone in phones), what="both devices pushed")
    for phone in phones:
        assert phone.got() == [shown(gone)]
        request = phone.requests()[0]
        push_service.verify_vapid(request, public_of(env["NOTIFY_VAPID_PRIVATE_KEY"]), SUBJECT)
        assert request.headers["topic"] == "o7" and request.headers["urgency"] == "normal"
        assert request.headers["ttl"] == "86400"  # as long as it stays in history (the default retention)
    await until_push(http, b, away, gone, {"state": "sent", "devices": 2})
    assert await push_state(http, a, here, seen["id"]) == {"state": "none", "devices": 0}

    read = await notify(http, a, here, push=PUSH, fallback={"when": "unread", "after_seconds": 2})
    left = await notify(http, a, here, push=PUSH, fallback={"when": "unread", "after_seconds": 2})
    await socket.notifications(3)
    await socket.send({"type": "ack", "id": read["id"]})
    await until(lambda: mine.got() != [], what="the unread one pushed")
    assert mine.got() == [shown(left)]
    await until_push(http, a, here, left, {"state": "sent", "devices": 1})
    assert await push_state(http, a, here, read["id"]) == {"state": "none", "devices": 0}

    # Read past the pushed one (through `b`, whichever replica pushed it): its device is told to close it.
    await socket.send({"type": "ack", "id": left["id"]})
    await until(lambda: len(mine.got()) == 2, what="the read push")
    assert mine.got()[1] == {"type": "read", "up_to": left["id"]}
    await asyncio.sleep(1.0)
    assert len(mine.got()) == 2 and all(len(phone.got()) == 1 for phone in phones)
    await socket.close()


async def test_offline_pushed_online_not_and_unread_after_n_across_replicas(redis_server, http, env, push_service):
    config = cluster_env(redis_server, **env)
    with started(Replica(config), Replica(config)) as (a, b):
        await offline_unread_and_read(http, a, b, env, push_service)


async def test_embedded_the_same(http, env, push_service):
    """The embedded broker: jobs and states in the process, with the same outcomes."""
    with started(Replica(env)) as (replica,):
        await offline_unread_and_read(http, replica, replica, env, push_service)


async def test_on_a_redis_cluster(http, env, push_service):
    """A Redis Cluster: devices beside each user's stream, jobs and states on hash-tagged shards."""
    with ClusterTopology() as cluster:
        config = cluster.env(**env)
        with started(Replica(config), Replica(config)) as (a, b):
            await offline_unread_and_read(http, a, b, env, push_service)


async def test_answers_gone_retried_and_refused(http, env, push_service, google):
    """404 and 410 remove the device; 429 with Retry-After is sent again after it; 413 is failed
    and never retried; FCM gets the v1 message, and UNREGISTERED removes the token."""
    with started(Replica(env)) as (replica,):
        user = uid()
        phones = {name: Phone(push_service, user, name) for name in ("gone404", "gone410", "busy", "big", "ok")}
        for phone in phones.values():
            await phone.register(http, replica)
        token_body = {"kind": "fcm", "token": "c" * 40 + ":APA91b" + "x" * 40}
        answer = await http.put(f"{replica.url}/me/devices/app", json=token_body, headers=as_user(user))
        assert answer.status_code == 200
        push_service.status[phones["gone404"].path] = (404, {}, b"")
        push_service.status[phones["gone410"].path] = (410, {}, b"")
        push_service.first[phones["busy"].path] = [(429, {"Retry-After": "2"}, b"")]
        push_service.status[phones["big"].path] = (413, {}, b"")

        sent = await notify(http, replica, user, push=PUSH)
        await until(lambda: phones["busy"].got() != [], what="the 429 retried")
        tried = phones["busy"].requests()
        assert len(tried) == 2
        assert tried[1].at - tried[0].at >= 1.9  # not before its Retry-After (a lower bound only)
        assert phones["ok"].got() == [shown(sent)]
        fcm = google.wait_for(2)
        messages = [r for r in fcm if r.path.endswith("messages:send")]
        assert len(messages) == 1
        await until_push(http, replica, user, sent, {"state": "sent", "devices": 6})

        devices = await http.get(f"{replica.url}/me/devices", headers=as_user(user))
        assert sorted(d["id"] for d in devices.json()["devices"]) == ["app", "big", "busy", "ok"]
        await asyncio.sleep(2.5)  # past the first retries' delays: the 413 was attempted once only
        assert len(phones["big"].requests()) == 1

        google.fcm_answer = (404, {}, b'{"error":{"status":"NOT_FOUND","details":[{"errorCode":"UNREGISTERED"}]}}')
        await notify(http, replica, user, push=PUSH)
        await until(lambda: len(phones["ok"].got()) == 2)

        async def app_removed() -> bool:
            found = await http.get(f"{replica.url}/me/devices", headers=as_user(user))
            return "app" not in [d["id"] for d in found.json()["devices"]]

        await until(app_removed, what="the unregistered token removed")

        # What was counted, by kind, result and answer; and how long encryption and sending took.
        for line, least in (
            ('notify_pushes_total{answer="201",kind="webpush",result="sent"}', 3),
            ('notify_pushes_total{answer="429",kind="webpush",result="retried"}', 1),
            ('notify_pushes_total{answer="413",kind="webpush",result="failed"}', 2),
            ('notify_pushes_total{answer="410",kind="webpush",result="gone"}', 1),
            ('notify_pushes_total{answer="200",kind="fcm",result="sent"}', 1),
            ('notify_pushes_total{answer="404",kind="fcm",result="gone"}', 1),
            ("notify_push_encrypt_seconds_count", 7),
            ("notify_push_send_seconds_count", 8),
        ):
            assert await metric(http, replica, line) >= least, line


async def test_failed_state_a_batch_item_and_a_retry_given_up_when_history_ends(http, env, push_service):
    """A user whose one device refuses (413) sees `failed`; a batch's user item pushes as a single
    publish does; a push its service keeps answering 503 is retried until its notification leaves
    history (3 s here), then given up (counted as expired)."""
    with started(Replica({**env, "NOTIFY_HISTORY_TTL_SECONDS": "3"})) as (replica,):
        refused, batched, busy = (Phone(push_service, uid(), "d") for _ in range(3))
        for phone in (refused, batched, busy):
            await phone.register(http, replica)
        push_service.status[refused.path] = (413, {}, b"")
        push_service.status[busy.path] = (503, {}, b"")

        sent = await notify(http, replica, refused.user, push=PUSH)
        await until_push(http, replica, refused.user, sent, {"state": "failed", "devices": 1})

        items = [{"user": batched.user, "event": "order.shipped", "push": PUSH}]
        answer = await http.post(f"{replica.url}/notify", json=items, headers=publisher_headers())
        assert answer.status_code == 200 and answer.json()["results"][0]["status"] == 202, answer.text
        await until(lambda: batched.got() != [], what="the batch item pushed")
        assert batched.got()[0]["id"] == answer.json()["results"][0]["id"]

        await notify(http, replica, busy.user, push=PUSH)
        expired = 'notify_pushes_total{answer="503",kind="webpush",result="expired"}'

        async def given_up() -> bool:
            return await metric(http, replica, expired) == 1

        await until(given_up, within=30, what="the retry given up")
        assert len(busy.requests()) >= 2 and busy.got() == []

        # A Retry-After past the notification's life: tried once more when it leaves history, then given up.
        slow = Phone(push_service, uid(), "d")
        await slow.register(http, replica)
        push_service.status[slow.path] = (429, {"Retry-After": "86400"}, b"")
        await notify(http, replica, slow.user, push=PUSH)
        late = 'notify_pushes_total{answer="429",kind="webpush",result="expired"}'

        async def late_given_up() -> bool:
            return await metric(http, replica, late) == 1

        await until(late_given_up, within=30, what="the far Retry-After given up with its notification")
        assert len(slow.requests()) == 2


async def test_a_push_too_large_is_refused_alike_on_both_paths(http, env):
    """Over 4,096 bytes once encrypted: 422 before anything is published, from the fast path and
    from the route (a browser's Origin sends it there) alike; `push` on a topic item is 422 too."""
    with started(Replica(env)) as (replica,):
        user = uid()
        big = {"event": "e", "push": {"title": "t", "body": "x" * 2000, "data": "y" * 2100}}
        answers = []
        for extra in ({}, {"Origin": "https://app.example.com"}):
            answer = await http.post(f"{replica.url}/notify/{user}", json=big, headers={**publisher_headers(), **extra})
            answers.append((answer.status_code, answer.json()))
        assert answers[0] == answers[1] and answers[0][0] == 422, answers
        assert "4096" in answers[0][1]["message"] and answers[0][1]["error"] == "invalid_request"
        inbox = await http.get(f"{replica.url}/me/notifications", headers=as_user(user))
        assert inbox.json()["notifications"] == []
        batch = [{"topic": "chat:x", "event": "e", "push": {"title": "t"}}]
        answer = await http.post(f"{replica.url}/notify", json=batch, headers=publisher_headers())
        assert answer.status_code == 422, answer.text


async def test_pushes_pending_on_a_killed_replica_reach_each_device_once(redis_server, http, env, push_service):
    """The push service holds every push unanswered; the replica holding them is SIGKILLed: within
    30 s each device has each push exactly once (the held ones answered 503, then sent again)."""
    config = cluster_env(redis_server, **env)
    with started(Replica(config), Replica(config)) as (a, b):
        user = uid()
        phones = [Phone(push_service, user, f"d{i}") for i in range(3)]
        for phone in phones:
            await phone.register(http, a)
        push_service.gate.clear()
        sent = [await notify(http, a, user, push=PUSH) for _ in range(3)]
        await until(lambda: len(push_service.received) >= 9, what="every push held")
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        push_service.gate.set()
        want = sorted(s["id"] for s in sent)
        await until(
            lambda: all(sorted(p["id"] for p in phone.got()) == want for phone in phones),
            within=30,
            what="each push once on every device",
        )
        assert time.monotonic() - killed < 30
        await asyncio.sleep(2.0)
        for phone in phones:
            assert sorted(p["id"] for p in phone.got()) == want
        await until_push(http, b, user, sent[0], {"state": "sent", "devices": 3})
