"""Signed webhooks, at least once: a real receiver started here verifies every request with the
`standardwebhooks` package; the service runs as real replicas, on the embedded broker and on Redis."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Any

import pytest

from .receiver import Received, Receiver, new_secret, receiving
from .test_bodies import UNPARSEABLE
from .utils import TIMEOUT, Client, Replica, cluster_env, publisher_headers, started, token

TOPICS = json.dumps({"chat": {"join": "any", "publish": True}})
FAST_RETRIES = "0.2,0.2,0.2,0.2"


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {token('ops', 'notify:admin')}"}


def env(
    *receivers: Receiver, events: tuple[str, ...] = ("topic.message", "notification.*"), **extra: str
) -> dict[str, str]:
    return {
        "NOTIFY_TOPICS": TOPICS,
        "NOTIFY_WEBHOOKS": json.dumps([r.endpoint(events=events) for r in receivers]),
        "NOTIFY_WEBHOOK_RETRY_SECONDS": FAST_RETRIES,
        "NOTIFY_MEMBER_PUBLISH_RATE": "off",  # members here say ten things at once
        **extra,
    }


async def say(replica: Replica, topic: str, *texts: str, user: str = "alice") -> Client:
    """A member joins `topic` on `replica` and publishes each text; returns the socket."""
    client = await Client.connect(replica, user)
    await client.welcome()
    await client.send({"type": "join", "topic": topic})
    assert (await client.recv())["type"] == "joined"
    for text in texts:
        await client.send({"type": "publish", "topic": topic, "event": "say", "data": {"text": text}})
        frame = await client.recv()
        while frame["type"] != "published":
            frame = await client.recv()
    return client


def texts(received: list[Received]) -> set[str]:
    return {r.event["data"]["data"]["text"] for r in received if r.event["type"] == "topic.message"}


async def test_embedded_signed_retried_with_one_id_and_reads_paced(http):
    """Embedded broker: a member's message reaches the receiver signed, in the documented shape; a
    receiver answering 500 three times then 200 gets it four times with the same webhook-id; read
    markers are told at most once a second per user, the latest one last."""

    first: list[str] = []

    def answer(webhook_id: str, nth: int) -> tuple[int, dict[str, str], float]:
        first[:] = first or [webhook_id]
        return (500 if webhook_id == first[0] and nth <= 3 else 200), {}, 0.0

    with receiving(answer) as receiver, started(Replica(env(receiver))) as (replica,):
        alice = await say(replica, "chat:lobby", "hello")
        got = await receiver.wait_for(lambda r: len(r) >= 4)
        assert len({r.id for r in got}) == 1 and len(got) == 4
        body = got[-1].event
        assert body["type"] == "topic.message" and body["timestamp"].endswith("Z") and len(body["timestamp"]) == 24
        data = body["data"]
        assert data["topic"] == "chat:lobby" and data["from"] == "alice" and data["event"] == "say"
        assert data["data"] == {"text": "hello"} and isinstance(data["ts"], int) and data["id"]
        assert len(got[0].headers["webhook-signature"].split(" ")) == 1
        # Read markers: three acks within a second are two events: the first, and the latest.
        ids = [(await http.post(replica.url + "/notify/alice", json={"event": "e"}, headers=_pub())).json()["id"]]
        for _ in range(2):
            ids.append(
                (await http.post(replica.url + "/notify/alice", json={"event": "e"}, headers=_pub())).json()["id"]
            )
        for notification_id in ids:
            await alice.send({"type": "ack", "id": notification_id})
        reads = await receiver.wait_for(lambda r: len([x for x in r if x.event["type"] == "notification.read"]) >= 2)
        markers = [r.event["data"] for r in reads if r.event["type"] == "notification.read"]
        assert markers[0] == {"user": "alice", "up_to": ids[0]} and markers[-1] == {"user": "alice", "up_to": ids[2]}
        await asyncio.sleep(1.5)
        assert len(receiver.events("notification.read")) == 2
        # An ack of an older id moves nothing, so tells nothing; one past the newest tells the newest.
        await alice.send({"type": "ack", "id": ids[0]})
        sent = await http.post(replica.url + "/notify/alice", json={"event": "e"}, headers=_pub())
        await alice.send({"type": "ack", "id": "99999999999999-1"})
        reads = await receiver.wait_for(lambda r: len([x for x in r if x.event["type"] == "notification.read"]) >= 3)
        assert [r.event["data"]["up_to"] for r in reads if r.event["type"] == "notification.read"][2:] == [
            sent.json()["id"]
        ]
        assert receiver.unverified == 0
        await alice.close()


async def test_unparseable_replay_bodies_answer_422(http):
    """A replay body that cannot be parsed, however it fails, is 422 invalid_request saying so, as
    on every other endpoint that takes a body (tests/test_bodies.py); nothing is replayed."""
    with receiving() as receiver, started(Replica(env(receiver))) as (replica,):
        headers = {**admin(), "Content-Type": "application/json"}
        for what, value in UNPARSEABLE.items():
            body = b'{"ids":' + value + b"}"
            answer = await http.post(replica.url + "/webhooks/dead/replay", content=body, headers=headers)
            assert answer.status_code == 422, (what, answer.text)
            assert answer.json()["message"].startswith("the body is not valid JSON: "), (what, answer.text)
        assert receiver.events() == []


def _pub() -> dict[str, str]:
    return {"Authorization": f"Bearer {token('backend', 'notify:publish')}"}


async def test_redirects_not_followed_and_answers_read_only_in_part(http):
    """A 3xx is a failed attempt (its Location is never called), and of a 1 MB error answer only
    the start is kept as the event's last error."""
    with receiving() as elsewhere:

        def answer(_id: str, nth: int) -> tuple[int, dict[str, str], float, bytes]:
            if nth <= 2:
                return 307, {"Location": elsewhere.url}, 0.0, b""
            return 500, {}, 0.0, b"x" * 1_000_000

        with receiving(answer) as receiver, started(Replica(env(receiver))) as (replica,):
            client = await say(replica, "chat:moved", "hi")

            async def one_dead() -> list | None:
                return await _admin_get(http, replica, "/webhooks/dead") or None

            (dead,) = await _until(one_dead)
            assert dead["attempts"] == 5 and dead["error"].startswith("HTTP 500: xxx") and len(dead["error"]) < 1000
            assert elsewhere.events() == [] and len(receiver.events()) == 5
            await client.close()


async def _admin_get(http, replica: Replica, path: str) -> Any:
    response = await http.get(replica.url + path, headers=admin())
    assert response.status_code == 200, response.text
    return response.json()


async def _until(check, timeout: float = 3 * TIMEOUT) -> Any:
    """Poll an async check until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        found = await check()
        if found or time.monotonic() > deadline:
            assert found, "condition never held"
            return found
        await asyncio.sleep(0.1)


async def test_two_replicas_share_the_queue(redis_server, http):
    """Messages said on either of two replicas each reach the receiver once, signed with every
    secret of the endpoint; the admin API shows the same counts on both replicas."""
    old = new_secret()
    with receiving() as receiver:
        endpoint = {**receiver.endpoint(), "secret": [old, receiver.secret], "events": ["topic.message"]}
        config = cluster_env(redis_server, **{**env(receiver), "NOTIFY_WEBHOOKS": json.dumps([endpoint])})
        with started(Replica(config), Replica(config)) as (a, b):
            topic = f"chat:{uuid.uuid4().hex[:8]}"
            first = await say(a, topic, *(f"a{i}" for i in range(10)))
            second = await say(b, topic, *(f"b{i}" for i in range(10)), user="bob")
            got = await receiver.wait_for(lambda r: len(texts(r)) == 20)
            assert len(got) == 20 and len({r.id for r in got}) == 20 and receiver.unverified == 0
            assert all(len(r.headers["webhook-signature"].split(" ")) == 2 for r in got)
            # Sent concurrently, they may arrive in any order; the message ids put them back in theirs.
            in_order = sorted(got, key=lambda r: tuple(map(int, r.event["data"]["id"].split("-"))))
            assert [r.event["data"]["data"]["text"] for r in in_order] == [
                *(f"a{i}" for i in range(10)),
                *(f"b{i}" for i in range(10)),
            ]

            async def settled() -> list | None:
                states = [await _admin_get(http, replica, "/webhooks") for replica in (a, b)]
                done = all(s[0]["delivered"] == 20 and s[0]["pending"] == 0 for s in states)
                return states if done else None

            states = await _until(settled)
            assert (
                states[0][0]["index"] == 0 and states[0][0]["url"] == receiver.url and states[0][0]["disabled"] is None
            )
            assert secrets_absent(states, old, receiver.secret)
            metrics = (await http.get(a.url + "/metrics")).text + (await http.get(b.url + "/metrics")).text
            assert 'notify_webhook_events_delivered_total{endpoint="0",type="topic.message"}' in metrics
            forbidden = await http.get(
                a.url + "/webhooks", headers={"Authorization": f"Bearer {token('x', 'notify:read')}"}
            )
            assert forbidden.status_code == 403 and forbidden.json()["error"] == "missing_scope"
            await first.close()
            await second.close()


def secrets_absent(value: Any, *secrets: str) -> bool:
    text = json.dumps(value)
    return not any(secret in text for secret in secrets)


async def test_retry_after_is_honoured(redis_server):
    """A 503 with Retry-After: 2 is attempted again no sooner than two seconds later (the delays say 0.2 s)."""

    def answer(_id: str, nth: int) -> tuple[int, dict[str, str], float]:
        return (503, {"Retry-After": "2"}, 0.0) if nth == 1 else (200, {}, 0.0)

    with receiving(answer) as receiver, started(Replica(cluster_env(redis_server, **env(receiver)))) as (replica,):
        client = await say(replica, "chat:later", "wait")
        got = await receiver.wait_for(lambda r: len(r) >= 2)
        assert got[0].id == got[1].id and got[1].at - got[0].at >= 2.0
        await client.close()


async def test_gone_disables_until_enabled_and_dead_events_replay(redis_server, http):
    """410 disables the endpoint on every replica: later events go dead, listed with why; enabling it
    and replaying them delivers each, with its webhook-id unchanged."""
    gone = {"yes": True}

    def answer(_id: str, nth: int) -> tuple[int, dict[str, str], float]:
        return (410, {}, 0.0) if gone["yes"] else (200, {}, 0.0)

    with receiving(answer) as receiver:
        config = cluster_env(redis_server, **env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            client = await say(a, "chat:gone", "first")
            await receiver.wait_for(lambda r: len(r) == 1)

            async def disabled_everywhere() -> bool:
                states = [(await _admin_get(http, r, "/webhooks"))[0] for r in (a, b)]
                return all(s["disabled"] and "410" in s["disabled"] for s in states)

            await _until(disabled_everywhere)
            await client.send({"type": "publish", "topic": "chat:gone", "event": "say", "data": {"text": "second"}})

            async def two_dead() -> list | None:
                dead = await _admin_get(http, b, "/webhooks/dead?limit=10")
                return dead if len(dead) == 2 else None

            dead = await _until(two_dead)
            assert {d["event"]["data"]["data"]["text"] for d in dead} == {"first", "second"}
            assert "410" in {d["event"]["data"]["data"]["text"]: d for d in dead}["first"]["error"]
            assert "disabled" in {d["event"]["data"]["data"]["text"]: d for d in dead}["second"]["error"]
            assert len(receiver.events()) == 1  # a disabled endpoint is not called
            metrics = (await http.get(a.url + "/metrics")).text
            assert 'notify_webhook_endpoint_disabled{endpoint="0"} 1.0' in metrics

            gone["yes"] = False
            enabled = await http.post(b.url + "/webhooks/0/enable", headers=admin())
            assert enabled.status_code == 200 and enabled.json()["disabled"] is None
            assert (await http.post(b.url + "/webhooks/7/enable", headers=admin())).status_code == 404
            first_id = {d["event"]["data"]["data"]["text"]: d for d in dead}["first"]["id"]
            replayed = await http.post(a.url + "/webhooks/dead/replay", json={"ids": [first_id]}, headers=admin())
            assert replayed.status_code == 200 and replayed.json() == {"replayed": 1}
            await receiver.wait_for(lambda r: [x.id for x in r].count(first_id) == 2)
            replayed = await http.post(a.url + "/webhooks/dead/replay", headers=admin())
            assert replayed.json() == {"replayed": 1}
            got = await receiver.wait_for(lambda r: texts(r) == {"first", "second"} and len(r) == 3)
            assert got[-1].event["data"]["data"]["text"] == "second"
            assert await _admin_get(http, a, "/webhooks/dead") == []
            await client.close()


async def test_dead_after_the_last_retry(http):
    """Embedded: after the last delay an event is dead, with the last answer as its error."""
    with receiving(lambda _id, _n: (500, {}, 0.0)) as receiver, started(Replica(env(receiver))) as (replica,):
        client = await say(replica, "chat:dead", "doomed")
        await receiver.wait_for(lambda r: len(r) == 5)  # the first attempt and one per delay

        async def one_dead() -> list | None:
            dead = await _admin_get(http, replica, "/webhooks/dead")
            return dead or None

        (dead,) = await _until(one_dead)
        assert dead["attempts"] == 5 and dead["error"].startswith("HTTP 500") and dead["id"] == receiver.events()[0].id
        state = (await _admin_get(http, replica, "/webhooks"))[0]
        assert state["dead"] == 1 and state["failed"] == 5 and state["pending"] == 0 and state["last_error"]
        await client.close()


@pytest.mark.slow
async def test_events_in_flight_on_a_killed_replica_arrive(redis_server):
    """A replica SIGKILLed while its attempts hang at the receiver: every event still reaches the
    receiver with a 2xx, from the surviving replica, within 30 s."""
    hanging = {"yes": True}

    def answer(_id: str, _nth: int) -> tuple[int, dict[str, str], float]:
        return (200, {}, 2.5 if hanging["yes"] else 0.0)

    with receiving(answer) as receiver:
        config = cluster_env(redis_server, **env(receiver, NOTIFY_WEBHOOK_TIMEOUT_SECONDS="2"))
        with started(Replica(config), Replica(config)) as (a, b):
            said = [f"m{i}" for i in range(12)]
            client = await say(b, f"chat:{uuid.uuid4().hex[:8]}", *said)
            await receiver.wait_for(lambda r: len(texts(r)) == len(said))  # each one's first attempt is hanging
            a.signal(9)
            killed_at = time.monotonic()
            hanging["yes"] = False
            # Each event answered 200 after the kill (the hung attempts timed out at 2 s, unanswered).
            await receiver.wait_for(lambda r: texts([x for x in r if x.at > killed_at + 0.1]) == set(said), timeout=30)
            await client.close()


PRESENCE_TOPICS = json.dumps({"chat": {"join": "any", "publish": True}, "room": {"join": "any", "presence": True}})


def presence_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return env(
        receiver,
        events=("user.*", "topic.*"),
        NOTIFY_TOPICS=PRESENCE_TOPICS,
        NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS="0.5",
        **extra,
    )


def told(received: list[Received], *types: str) -> list[tuple[str, dict[str, Any]]]:
    return [(r.event["type"], r.event["data"]) for r in received if r.event["type"] in types]


async def connected(replica: Replica, user: str) -> Client:
    client = await Client.connect(replica, user)
    await client.welcome()
    return client


async def test_users_online_and_offline_across_replicas(redis_server):
    """A user's first socket anywhere is user.online; a second device on another replica, or a
    reconnect within the grace, is no event; their last socket gone is user.offline after the grace."""
    with receiving() as receiver:
        config = cluster_env(redis_server, **presence_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            user = f"u{uuid.uuid4().hex[:8]}"
            on_a = await connected(a, user)
            await receiver.wait_for(lambda r: told(r, "user.online") == [("user.online", {"user": user})])
            on_b = await connected(b, user)
            await on_a.close()
            await on_b.close()
            back = await connected(a, user)  # within the grace: neither offline nor online
            await asyncio.sleep(1.5)
            assert told(receiver.events(), "user.online", "user.offline") == [("user.online", {"user": user})]
            await back.close()
            got = await receiver.wait_for(lambda r: len(told(r, "user.offline")) == 1)
            assert told(got, "user.online", "user.offline")[-1] == ("user.offline", {"user": user})
            assert receiver.unverified == 0


async def test_topic_occupied_members_and_vacated(redis_server):
    """A topic's first member is topic.occupied, its last one leaving topic.vacated (after the
    grace), in every namespace; members added and removed where the namespace shows presence."""
    with receiving() as receiver:
        config = cluster_env(redis_server, **presence_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            room, chat = f"room:{uuid.uuid4().hex[:8]}", f"chat:{uuid.uuid4().hex[:8]}"
            alice, bob = await connected(a, "alice"), await connected(b, "bob")
            for client, topic in ((alice, room), (bob, room), (alice, chat)):
                await client.send({"type": "join", "topic": topic})
                assert (await client.recv())["type"] == "joined"
            await alice.send({"type": "leave", "topic": room})
            await bob.close()
            await alice.send({"type": "leave", "topic": chat})
            types = ("topic.occupied", "topic.vacated", "topic.member_added", "topic.member_removed")
            got = await receiver.wait_for(lambda r: len(told(r, *types)) == 8)
            in_room = [(t, d) for t, d in told(got, *types) if d["topic"] == room]
            # Events sent at the same moment may arrive in either order; a grace apart, they do not.
            assert in_room.index(("topic.occupied", {"topic": room})) < in_room.index(
                ("topic.vacated", {"topic": room})
            )
            assert sorted(in_room, key=str) == sorted(
                [
                    ("topic.occupied", {"topic": room}),
                    ("topic.member_added", {"topic": room, "user": "alice"}),
                    ("topic.member_added", {"topic": room, "user": "bob"}),
                    ("topic.member_removed", {"topic": room, "user": "alice"}),
                    ("topic.member_removed", {"topic": room, "user": "bob"}),
                    ("topic.vacated", {"topic": room}),
                ],
                key=str,
            )
            assert [(t, d) for t, d in told(got, *types) if d["topic"] == chat] == [
                ("topic.occupied", {"topic": chat}),
                ("topic.vacated", {"topic": chat}),
            ]
            await alice.close()


async def test_embedded_presence_events():
    """Embedded broker: user.online, and user.offline after the grace."""
    with receiving() as receiver, started(Replica(presence_env(receiver))) as (replica,):
        client = await connected(replica, "erin")
        await receiver.wait_for(lambda r: told(r, "user.online") == [("user.online", {"user": "erin"})])
        await client.close()
        await receiver.wait_for(lambda r: told(r, "user.offline") == [("user.offline", {"user": "erin"})])


@pytest.mark.slow
async def test_user_offline_from_a_killed_replica(redis_server):
    """A replica SIGKILLed: user.offline within 15 s for a user whose sockets were only there, none
    for a user who still has a socket on the surviving replica."""
    with receiving() as receiver:
        config = cluster_env(redis_server, **presence_env(receiver))
        with started(Replica(config), Replica(config)) as (a, b):
            only_a, both = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
            sockets = [await connected(a, only_a), await connected(a, both), await connected(b, both)]
            await receiver.wait_for(lambda r: len(told(r, "user.online")) == 2)
            a.signal(9)
            killed_at = time.monotonic()
            got = await receiver.wait_for(lambda r: told(r, "user.offline") != [], timeout=20)
            assert told(got, "user.offline") == [("user.offline", {"user": only_a})]
            assert got[-1].at - killed_at < 15
            await asyncio.sleep(2)
            assert told(receiver.events(), "user.offline") == [("user.offline", {"user": only_a})]
            await sockets[2].close()


@pytest.mark.slow
async def test_a_stopping_replica_hands_its_attempts_back(redis_server, http):
    """SIGTERM while attempts hang at the receiver: the stopping replica hands its events back and
    the other delivers each one long before their lease (attempt timeout 30 s + 10 s) would end."""
    hanging = {"yes": True}

    def answer(_id: str, _nth: int) -> tuple[int, dict[str, str], float]:
        return (200, {}, 4.0 if hanging["yes"] else 0.0)

    with receiving(answer) as receiver:
        extra = {"NOTIFY_WEBHOOK_TIMEOUT_SECONDS": "30", "NOTIFY_DRAIN_SECONDS": "0"}
        config = cluster_env(redis_server, **env(receiver, **extra))
        with started(Replica(config), Replica(config)) as (a, b):
            said = [f"t{i}" for i in range(8)]
            client = await say(a, f"chat:{uuid.uuid4().hex[:8]}", *said)
            await receiver.wait_for(lambda r: len(texts(r)) == len(said))
            hanging["yes"] = False
            a.signal(15)

            async def all_delivered() -> bool:
                state = (await _admin_get(http, b, "/webhooks"))[0]
                return state["delivered"] == len(said) and state["pending"] == 0

            await _until(all_delivered, timeout=20)
            # The stopping replica held some: they were asked for again, by the other.
            assert len(receiver.events()) > len(said)
            await client.close()


async def test_an_endpoint_that_never_answers_slows_nothing_else(redis_server, http):
    """Two endpoints, one hanging on every request and one answering at once: the hanging one holds
    at most its share of attempts, so the other gets every event before any hanging attempt has
    run out of time (a retry would show that), and sockets keep getting their frames meanwhile."""
    released = threading.Event()

    def hang(_id: str, _nth: int) -> tuple[int, dict[str, str], float]:
        released.wait(120)
        return (200, {}, 0.0)

    with receiving(hang) as hanging, receiving() as prompt:
        config = cluster_env(
            redis_server,
            **env(
                hanging,
                prompt,
                NOTIFY_WEBHOOK_TIMEOUT_SECONDS="30",
                NOTIFY_WEBHOOK_ENDPOINT_CONCURRENCY="8",
                NOTIFY_MAX_INBOUND_RATE="1000",  # one member says 100 things at once
            ),
        )
        try:
            with started(Replica(config)) as (replica,):
                topic = f"chat:{uuid.uuid4().hex[:8]}"
                watcher = await Client.connect(replica, "carol")
                await watcher.welcome()
                said = [f"m{i}" for i in range(100)]  # more than the 64 attempts every endpoint shares
                speaker = await say(replica, topic, *said)
                got = await prompt.wait_for(lambda r: texts(r) == set(said), timeout=60)
                # A backend's notification still reaches a socket while the hanging attempts wait.
                posted = await http.post(
                    replica.url + "/notify/carol",
                    json={"event": "ping", "data": {"n": 1}},
                    headers=publisher_headers(),
                )
                assert posted.status_code in (200, 202), posted.text
                frame = await watcher.recv()
                while frame.get("type") != "notification":
                    frame = await watcher.recv()
                assert frame["event"] == "ping"
                seen = hanging.events()
                # Every hanging attempt is still its first: none has run out of its 30 s yet.
                assert len({r.id for r in seen}) == len(seen)
                assert 1 <= len(seen) <= 8 and len(got) == len(said) and prompt.unverified == 0
                await speaker.close()
                await watcher.close()
        finally:
            released.set()


async def test_a_disabled_endpoint_stays_disabled_across_a_replica_restart(redis_server, http):
    """A replica (re)starting with the same endpoints keeps a 410'd endpoint disabled for every
    replica; one starting with another URL at that position (a new configuration) enables it."""

    def answer(_id: str, _nth: int) -> tuple[int, dict[str, str], float]:
        return (410, {}, 0.0)

    with receiving(answer) as receiver, receiving() as moved:
        config = cluster_env(redis_server, **env(receiver))
        with started(Replica(config)) as (a,):
            client = await say(a, "chat:restart", "first")

            async def disabled(replica: Replica) -> bool:
                return bool((await _admin_get(http, replica, "/webhooks"))[0]["disabled"])

            await _until(lambda: disabled(a))
            await client.close()
        with started(Replica(config)) as (again,):
            assert await disabled(again)
            client = await say(again, "chat:restart", "second")

            async def two_dead() -> dict[str, str] | None:
                dead = await _admin_get(http, again, "/webhooks/dead?limit=10")
                return {d["event"]["data"]["data"]["text"]: d["error"] for d in dead} if len(dead) == 2 else None

            errors = await _until(two_dead)
            assert "410" in errors["first"] and "disabled" in errors["second"]
            assert len(receiver.events()) == 1  # "second" went dead without a request
            await client.close()
        renamed = {**config, "NOTIFY_WEBHOOKS": json.dumps([moved.endpoint(events=["topic.message"])])}
        with started(Replica(renamed)) as (changed,):
            assert not await disabled(changed)
            client = await say(changed, "chat:restart", "third")
            await moved.wait_for(lambda r: texts(r) == {"third"})
            await client.close()
