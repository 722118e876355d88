"""Topics across real replicas: a chat room, permissions, resume, moderation, presence."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import websockets

from .utils import TIMEOUT, Client, Replica, cluster_env, publisher_headers, sse_events, token

NAMESPACES = {
    "chat": {"join": "any", "publish": True, "signals": True, "presence": True, "join_leave": True},
    "room": {"join": "token", "publish": True, "presence": True},
    "dash": {"join": "any"},
    "tiny": {"join": "any", "presence": True, "max_members": 1},
}


def topics_env(redis_server: Any, **extra: str) -> dict[str, str]:
    return cluster_env(
        redis_server,
        NOTIFY_TOPICS=json.dumps(NAMESPACES),
        NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS="1",
        NOTIFY_PRESENCE_DEAD_AFTER_SECONDS="4",
        **extra,
    )


@pytest.fixture(scope="module")
def rooms(redis_server) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas sharing Redis, with topic namespaces configured."""
    env = topics_env(redis_server)
    a, b = Replica(env).start(), Replica(env).start()
    yield a, b
    a.stop()
    b.stop()


def uid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def connect(replica: Replica, user: str, **claims: Any) -> Client:
    ws = await websockets.connect(f"{replica.ws_url}?token={token(user, **claims)}", open_timeout=TIMEOUT)
    client = Client(ws)
    await client.welcome()
    return client


async def frame_of(client: Client, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next frame of a kind; other kinds met on the way are skipped."""
    async with asyncio.timeout(timeout):
        while True:
            frame = await client.recv(timeout)
            if frame["type"] == kind:
                return frame


async def close_code(client: Client) -> int | None:
    """The code the server closes the socket with (frames until then are skipped)."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await client.ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd is not None else None


async def only_they_were_closed(other: Client) -> None:
    """Another user's socket still answers, then is closed by its client."""
    await other.send({"type": "ping"})
    assert (await frame_of(other, "pong"))["type"] == "pong", "other users are untouched"
    await other.close()


async def join(client: Client, topic: str, **extra: Any) -> dict[str, Any]:
    await client.send({"type": "join", "topic": topic, **extra})
    frame = await client.recv()
    return frame


async def test_chat_room_across_two_replicas(rooms):
    """The classic chat room: joins, a message from alice to both, bob typing, a refused outsider, bob leaving."""
    a, b = rooms
    lobby = f"chat:{uid('lobby')}"
    alice_id, bob_id = uid("alice"), uid("bob")
    alice, bob, outsider = await connect(a, alice_id), await connect(b, bob_id), await connect(a, uid("eve"))
    joined = await join(alice, lobby)
    assert joined["type"] == "joined" and joined["topic"] == lobby and joined["count"] == 1 and "cursor" in joined
    assert (await join(bob, lobby))["count"] == 2
    seen = await frame_of(alice, "presence")
    if seen["joined"] == [alice_id]:  # alice's own join, announced before bob's
        seen = await frame_of(alice, "presence")
    # One announcement per interval: alice's own join may share it.
    assert seen["topic"] == lobby and bob_id in seen["joined"] and set(seen["joined"]) <= {alice_id, bob_id}
    assert seen["left"] == [] and seen["count"] == 2

    await alice.send({"type": "publish", "topic": lobby, "event": "msg", "data": {"text": "hi"}})
    # The sender gets its own message (it may come before the answer) and `published`.
    answers = {frame["type"]: frame for frame in [await alice.recv(), await alice.recv()]}
    published = answers["published"]
    for message in (answers["notification"], *(await bob.notifications(1))):
        assert message["id"] == published["id"] and message["topic"] == lobby
        assert message["data"] == {"text": "hi"} and message["from"] == alice_id
    await bob.send({"type": "signal", "topic": lobby, "event": "typing", "data": True})
    typing = await frame_of(alice, "signal")
    assert typing["event"] == "typing" and typing["from"].startswith("bob-") and "id" not in typing
    await bob.nothing(0.3)  # neither bob's own typing signal nor a second copy of the message

    await outsider.send({"type": "publish", "topic": lobby, "event": "msg", "data": "spam"})
    refused = await frame_of(outsider, "error")
    assert refused["code"] == "forbidden" and refused["topic"] == lobby
    await outsider.send({"type": "ping"})
    assert (await outsider.recv())["type"] == "pong", "the socket stays open after a refusal"

    await bob.send({"type": "leave", "topic": lobby})
    assert await frame_of(bob, "left") == {"type": "left", "topic": lobby}
    gone = await frame_of(alice, "presence", timeout=3 * TIMEOUT)
    assert gone == {"type": "presence", "topic": lobby, "joined": [], "left": [bob_id], "count": 1}
    for client in (alice, bob, outsider):
        await client.close()


async def test_permission_by_claim_wildcard_and_topic_token(rooms):
    a, _ = rooms
    room = f"room:{uid('r')}"
    user = uid("p")
    by_claim = await connect(a, user, topics=[room])
    assert (await join(by_claim, room))["type"] == "joined"
    by_wildcard = await connect(a, user, topics=["room:*"])
    assert (await join(by_wildcard, room))["type"] == "joined"
    plain = await connect(a, user)
    refused = await join(plain, room)
    assert refused["type"] == "error" and refused["code"] == "forbidden" and refused["topic"] == room
    assert (await join(plain, room, token=token(user, topic=room)))["type"] == "joined"

    stranger = await connect(a, uid("q"))
    for topic_token, why in (
        (token(user, topic=room), "another user's topic token"),
        (token(user, topic=room, ttl=-10), "expired"),
        (token(user, topic=f"{room}x"), "wrong topic"),
        ("not-a-jwt", "malformed"),
    ):
        answer = await join(stranger, room, token=topic_token)
        assert answer["type"] == "error" and answer["code"] == "forbidden", why
    near_miss = await connect(a, uid("w"), topics=["chat:*"])
    assert (await join(near_miss, "chatx:a"))["code"] == "unknown_namespace"
    wrong_ns = await connect(a, uid("w"), topics=["dash:*"])
    assert (await join(wrong_ns, room))["code"] == "forbidden", "`dash:*` does not open `room:`"
    for client in (by_claim, by_wildcard, plain, stranger, near_miss, wrong_ns):
        await client.close()


async def test_topic_names_refused_with_every_forbidden_character(rooms, http):
    a, _ = rooms
    client = await connect(a, uid())
    for bad in ["chat:a b", "chat:a*", "chat:a?", "chat:[a]", "chat:a/b", "chat:a\x00", "chat:é", "", "c" * 201, 7]:
        answer = await join(client, bad)  # type: ignore[arg-type]
        assert answer["type"] == "error" and answer["code"] == "invalid_topic", bad
    assert (await join(client, "nowhere:x"))["code"] == "unknown_namespace"
    response = await http.post(f"{a.url}/topics/chat:a*b", json={"event": "e"}, headers=publisher_headers())
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"
    response = await http.post(f"{a.url}/topics/nowhere:x", json={"event": "e"}, headers=publisher_headers())
    assert response.status_code == 404
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    await client.close()


async def test_member_cap_and_topics_per_connection(redis_server):
    env = topics_env(redis_server, NOTIFY_MAX_TOPICS_PER_CONNECTION="2")
    replica = Replica(env).start()
    try:
        first, second = await connect(replica, uid()), await connect(replica, uid())
        tiny = f"tiny:{uid()}"
        assert (await join(first, tiny))["count"] == 1
        full = await join(second, tiny)
        assert full["code"] == "full" and full["topic"] == tiny
        assert (await join(first, f"dash:{uid()}"))["type"] == "joined"
        too_many = await join(first, f"dash:{uid()}")
        assert too_many["code"] == "too_many_topics"
        await first.close()
        await second.close()
    finally:
        replica.stop()


async def test_backend_publish_resume_and_history_across_replicas(rooms, http):
    """A member resumes a topic with `since` on the other replica while a backend publishes: none lost, none doubled."""
    a, b = rooms
    topic = f"dash:{uid('d')}"
    url = f"{a.url}/topics/{topic}"
    viewer_id = topic  # a user named as the topic: nothing of one stream may show in the other
    viewer = await connect(a, viewer_id)
    await join(viewer, topic)
    sent: list[str] = []

    async def backend(count: int) -> None:
        for n in range(count):
            response = await http.post(url, json={"event": "tick", "data": n}, headers=publisher_headers())
            assert response.status_code == 202, response.text
            sent.append(response.json()["id"])
            await asyncio.sleep(0.01)

    await backend(5)
    first = await viewer.notifications(5)
    assert [f["id"] for f in first] == sent and all(f["topic"] == topic and "from" not in f for f in first)
    await viewer.close()
    publishing = asyncio.create_task(backend(30))
    await asyncio.sleep(0.1)
    again = await connect(b, viewer_id)
    resumed = await join(again, topic, since=first[-1]["id"])
    assert resumed["type"] == "joined" and resumed["recovered"] is True
    await publishing
    rest = await again.notifications(30)
    assert [f["id"] for f in rest] == sent[5:]
    await again.nothing(0.3)
    history = await http.get(f"{b.url}/topics/{topic}/history?limit=3", headers=publisher_headers())
    assert [n["id"] for n in history.json()["notifications"]] == sent[::-1][:3]
    # The member's inbox holds the one notification sent to them, none of the 35 topic messages they got.
    direct = await http.post(f"{a.url}/notify/{viewer_id}", json={"event": "direct"}, headers=publisher_headers())
    assert direct.status_code == 202
    inbox = await http.get(f"{a.url}/me/notifications", headers={"Authorization": f"Bearer {token(viewer_id)}"})
    assert inbox.json()["unread"] == 1, "topics are not in the inbox"
    assert [n["id"] for n in inbox.json()["notifications"]] == [direct.json()["id"]], "topics are not in the inbox"
    await again.close()


async def test_presence_over_rest_and_moderation_across_replicas(rooms, http):
    a, b = rooms
    topic = f"chat:{uid('m')}"
    carol, dave = uid("carol"), uid("dave")
    carol_a, carol_b, dave_b = await connect(a, carol), await connect(b, carol), await connect(b, dave)
    for client in (carol_a, carol_b, dave_b):
        assert (await join(client, topic))["type"] == "joined"
    presence = await http.get(f"{a.url}/topics/{topic}/presence", headers=publisher_headers())
    assert presence.json() == {"topic": topic, "count": 2, "users": sorted([carol, dave]), "truncated": False}
    await dave_b.send({"type": "presence", "topic": topic})
    members = await frame_of(dave_b, "members")
    assert members["users"] == sorted([carol, dave]) and members["count"] == 2

    not_admin = await http.delete(f"{a.url}/topics/{topic}/members/{carol}", headers=publisher_headers())
    assert not_admin.status_code == 403
    admin = {"Authorization": f"Bearer {token('ops', 'notify:admin')}"}
    removed = await http.delete(f"{a.url}/topics/{topic}/members/{carol}", headers=admin)
    assert removed.status_code == 202
    for socket in (carol_a, carol_b):
        assert await frame_of(socket, "left") == {"type": "left", "topic": topic, "reason": "removed"}
    response = await http.post(f"{b.url}/topics/{topic}", json={"event": "after"}, headers=publisher_headers())
    assert response.status_code == 202
    [message] = await dave_b.notifications(1)
    assert message["event"] == "after"
    await carol_a.nothing(0.3)

    disconnected = await http.post(f"{b.url}/users/{carol}/disconnect", headers=admin)
    assert disconnected.status_code == 202
    for socket in (carol_a, carol_b):
        assert await close_code(socket) == 4403
    await only_they_were_closed(dave_b)


async def test_dashboard_topic_over_sse_resumes_with_last_event_id(rooms, http):
    a, b = rooms
    topic = f"dash:{uid('s')}"
    user = uid("sse")

    async def read(replica: Replica, count: int, last_event_id: str | None = None) -> list[dict[str, Any]]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        return await sse_events(
            f"{replica.url}/events?token={token(user)}&topics={topic}", headers, count, "notification"
        )

    async def tick(replica: Replica, n: int) -> str:
        response = await http.post(
            f"{replica.url}/topics/{topic}", json={"event": "tick", "data": n}, headers=publisher_headers()
        )
        assert response.status_code == 202
        return str(response.json()["id"])

    reader = asyncio.create_task(read(a, 2))
    await asyncio.sleep(0.5)
    first = [await tick(b, 0), await tick(b, 1)]
    events = await reader
    assert [e["data"]["id"] for e in events if e["data"]["type"] == "notification"] == first
    position = events[-1]["id"]
    assert position.split(",")[2] == first[-1]
    missed = [await tick(a, n) for n in range(2, 5)]
    resumed = await read(b, 3, position)
    assert [e["data"]["id"] for e in resumed if e["data"]["type"] == "notification"] == missed
    joined = next(e["data"] for e in resumed if e["data"]["type"] == "joined")
    assert joined["recovered"] is True
    refused = await http.get(f"{a.url}/events?token={token(user)}&topics=room:{uid()}")
    assert refused.status_code == 403 and refused.json()["error"] == "forbidden"


@pytest.mark.slow
async def test_presence_is_right_again_after_a_replica_is_killed(redis_server, http):
    """SIGKILL a replica while members sit on both: within 15 s the others see `leave` for each user
    who had sockets only there, counts are right again, and a user who reconnected elsewhere gets none."""
    env = topics_env(redis_server)
    doomed, survivor = Replica(env).start(), Replica(env).start()
    try:
        topic = f"chat:{uid('k')}"
        watcher_id = uid("watch")
        watcher = await connect(survivor, watcher_id)
        await join(watcher, topic)
        gone, mover = uid("gone"), uid("mover")
        gone_socket, mover_socket = await connect(doomed, gone), await connect(doomed, mover)
        await join(gone_socket, topic)
        await join(mover_socket, topic)
        seen: set[str] = set()
        while not {gone, mover} <= seen:  # in one announcement or more, the watcher's own join too
            seen |= set((await frame_of(watcher, "presence"))["joined"])
        doomed.signal(signal.SIGKILL)
        doomed.proc.wait(TIMEOUT)  # type: ignore[union-attr]
        moved = await connect(survivor, mover)
        assert (await join(moved, topic))["type"] == "joined"
        leave = await frame_of(watcher, "presence", timeout=15)
        assert leave["left"] == [gone] and leave["joined"] == [] and leave["count"] == 2
        await watcher.nothing(2.0)  # no leave for the user who reconnected to the survivor
        presence = await http.get(f"{survivor.url}/topics/{topic}/presence", headers=publisher_headers())
        assert presence.json()["users"] == sorted([mover, watcher_id]) and presence.json()["count"] == 2
        await watcher.close()
        await moved.close()
    finally:
        doomed.stop()
        survivor.stop()


async def test_topics_on_the_embedded_broker(http):
    """One replica without Redis keeps the same topic contract: joins, messages, presence, leave after the grace."""
    replica = Replica({"NOTIFY_TOPICS": json.dumps(NAMESPACES), "NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS": "0.5"}).start()
    try:
        topic = f"chat:{uid('e')}"
        first, second = uid("one"), uid("two")
        one, two = await connect(replica, first), await connect(replica, second)
        assert (await join(one, topic))["count"] == 1
        assert (await join(two, topic))["count"] == 2
        seen = await frame_of(one, "presence")
        if seen["joined"] == [first]:
            seen = await frame_of(one, "presence")
        assert second in seen["joined"] and seen["count"] == 2
        response = await http.post(
            f"{replica.url}/topics/{topic}", json={"event": "e", "data": 1}, headers=publisher_headers()
        )
        assert response.status_code == 202 and response.json()["members"] == 2
        for client in (one, two):
            [message] = await client.notifications(1)
            assert message["id"] == response.json()["id"] and "from" not in message
        await two.close()
        leave = await frame_of(one, "presence", timeout=3 * TIMEOUT)
        assert leave == {"type": "presence", "topic": topic, "joined": [], "left": [second], "count": 1}
        presence = await http.get(f"{replica.url}/topics/{topic}/presence", headers=publisher_headers())
        assert presence.json()["users"] == [first]
        await one.close()
    finally:
        replica.stop()


async def test_batch_carries_topic_items_beside_user_items(rooms, http):
    a, b = rooms
    topic, user = f"dash:{uid('b')}", uid("batch")
    member, person = await connect(b, uid("m")), await connect(b, user)
    await join(member, topic)
    items = [
        {"topic": topic, "event": "t", "data": 1},
        {"user": user, "event": "u", "data": 2},
        {"topic": "chat:bad name", "event": "t"},
        {"topic": "nowhere:x", "event": "t"},
        {"topic": topic, "user": user, "event": "both"},
    ]
    response = await http.post(f"{a.url}/notify", json=items[:4], headers=publisher_headers())
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [202, 202, 422, 404]
    assert results[0]["online"] == 1, "a topic item counts the topic's members"
    [to_topic] = await member.notifications(1)
    [to_user] = await person.notifications(1)
    assert (to_topic["id"], to_topic["topic"]) == (results[0]["id"], topic) and to_user["id"] == results[1]["id"]
    both = await http.post(f"{a.url}/notify", json=items[4:], headers=publisher_headers())
    assert both.status_code == 422 and both.json()["error"] == "invalid_request"
    await member.close()
    await person.close()


async def test_every_route_takes_a_user_id_with_a_slash(rooms, http):
    """Ids with `/` (and `%`, `?`, `#`) are ordinary user ids: published to, read, moderated on
    every route, percent-encoded in the path as any client library writes them."""
    a, b = rooms
    topic = f"chat:{uid('slash')}"
    user = f"team/{uid('bob')}%?#"
    path = quote(user, safe="")
    bob, other = await connect(b, user), await connect(b, uid("other"))
    for client in (bob, other):
        assert (await join(client, topic))["type"] == "joined"

    sent = await http.post(f"{a.url}/notify/{path}", json={"event": "hi"}, headers=publisher_headers())
    assert sent.status_code == 202
    [frame] = await bob.notifications(1)
    inbox = await http.get(f"{a.url}/users/{path}/notifications", headers=publisher_headers())
    assert inbox.status_code == 200 and [n["id"] for n in inbox.json()["notifications"]] == [frame["id"]]
    status = await http.get(f"{a.url}/notifications/{frame['id']}", params={"user": user}, headers=publisher_headers())
    assert status.status_code == 200 and status.json()["user"] == user

    admin = {"Authorization": f"Bearer {token('ops', 'notify:admin')}"}
    removed = await http.delete(f"{a.url}/topics/{topic}/members/{path}", headers=admin)
    assert removed.status_code == 202 and removed.json() == {"topic": topic, "user": user}
    assert await frame_of(bob, "left") == {"type": "left", "topic": topic, "reason": "removed"}

    disconnected = await http.post(f"{a.url}/users/{path}/disconnect", headers=admin)
    assert disconnected.status_code == 202 and disconnected.json() == {"user": user}
    assert await close_code(bob) == 4403
    await only_they_were_closed(other)
