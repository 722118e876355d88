"""History and resume: nothing lost, nothing doubled, across reconnects and replicas."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from service.broker.base import build_frame, frame_parts
from service.config.settings import Settings
from service.core.ids import id_key
from service.delivery.connection import Connection
from service.telemetry.metrics import Metrics

from .utils import SECRET, TIMEOUT, Client, cluster_env, publish, publisher_headers, replicas, sse_events, token


def uid(prefix: str = "h") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_offline_user_resumes_exactly_what_was_missed_then_live(pair, http):
    """100 notifications published while offline arrive after `since`, in order, then live ones follow."""
    a, b = pair
    user = uid()
    first = await Client.connect(a, user)
    await first.welcome()
    seen = (await publish(http, a, user, "before")).json()["id"]
    await first.notifications(1)
    await first.close()
    missed = [(await publish(http, a, user, "missed", n)).json()["id"] for n in range(100)]
    client = await Client.connect(b, user, f"since={seen}")
    welcome = await client.welcome()
    assert welcome["recovered"] is True
    frames = await client.notifications(100)
    assert [f["id"] for f in frames] == missed
    assert [f["data"] for f in frames] == list(range(100))
    live = (await publish(http, a, user, "live")).json()["id"]
    assert [f["id"] for f in await client.notifications(1)] == [live]
    await client.nothing(0.2)
    await client.close()


async def test_since_older_than_history_says_not_recovered(pair, http):
    """When the cursor fell out of the retained history, welcome says recovered: false."""
    a, _ = pair
    user = uid()
    oldest = (await publish(http, a, user, "old")).json()["id"]
    await publish(http, a, user, "old-too")
    for n in range(100):  # history keeps 100 per user: the one after `oldest` is trimmed away
        await publish(http, a, user, "n", n)
    client = await Client.connect(a, user, f"since={oldest}")
    assert (await client.welcome())["recovered"] is False
    await client.close()
    bad = await Client.connect(a, user, "since=yesterday")
    assert (await bad.welcome())["recovered"] is False
    assert (await bad.recv())["code"] == "invalid_cursor"
    await bad.close()


async def test_broadcast_cursor_resumes_broadcasts(pair, http):
    """`broadcast_since` replays broadcasts missed while offline, and `since` the user's own; each
    stream in its own order (ids are never compared across streams)."""
    a, b = pair
    user = uid()
    broadcast_cursor = (await publish(http, a, None, "b0")).json()["id"]
    cursor = (await publish(http, b, user, "m0")).json()["id"]
    broadcasts, mine = [], []
    for n in range(3):
        broadcasts.append((await publish(http, a, None, "bcast", n)).json()["id"])
        mine.append((await publish(http, b, user, "mine", n)).json()["id"])
    client = await Client.connect(b, user, f"since={cursor}&broadcast_since={broadcast_cursor}")
    assert (await client.welcome())["recovered"] is True
    frames = await client.notifications(6)
    assert [f["id"] for f in frames if f.get("broadcast")] == broadcasts
    assert [f["id"] for f in frames if not f.get("broadcast")] == mine
    await client.close()


async def test_no_loss_or_duplicate_at_the_seam(pair, http):
    """Publishing continuously while a client reconnects with since: every notification exactly once."""
    a, b = pair
    user = uid()
    total = 300
    accepted: list[str] = []

    async def publisher() -> None:
        async with httpx.AsyncClient(timeout=10) as pub:
            for n in range(total):
                response = await publish(pub, a, user, "seam", n)
                assert response.status_code == 202
                accepted.append(response.json()["id"])
                await asyncio.sleep(0.002)

    received: list[dict] = []
    client = await Client.connect(b, user)
    await client.welcome()
    task = asyncio.create_task(publisher())
    received += await client.notifications(50)
    await client.close()
    for hop in range(3):
        target = (a, b)[hop % 2]
        client = await Client.connect(target, user, f"since={received[-1]['id']}")
        assert (await client.welcome())["recovered"] is True
        received += await client.notifications(40)
        await client.close()
    client = await Client.connect(b, user, f"since={received[-1]['id']}")
    await client.welcome()
    await task
    received += await client.notifications(total - len(received), timeout=3 * TIMEOUT)
    ids = [f["id"] for f in received]
    diag = f"accepted={accepted}\nreceived={ids}\nA:{a.output()}\nB:{b.output()}"
    assert len(ids) == len(set(ids)), diag
    try:
        await client.nothing(0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diag}") from None
    assert ids == accepted, diag
    await client.close()


async def test_live_frame_that_the_replay_covered_is_not_sent_again():
    """The history read can see a notification whose pub/sub message reaches the replica only after
    the replay was queued: the socket still gets it once, and every later one in order."""
    sent: list[str] = []

    async def send(frame: str) -> None:
        sent.append(frame)

    async def close(code: int, reason: str) -> None:
        raise AssertionError(f"closed {code} {reason}")

    def frame(n: int, stream: str = "u:u") -> str:
        return build_frame(f"1000-{n}", '"e"', str(n), 1, frame_parts(stream))

    conn = Connection("u", 2e9, Settings(jwt_secret=SECRET), Metrics("r"), close)  # type: ignore[arg-type]
    conn.hold("u:u", "b")
    conn.push("u:u", frame(3))  # live while the history was read: held, and covered by the replay
    conn.release(["welcome", frame(2), frame(3), frame(4)], {"u:u": id_key("1000-4")}, "u:u", "b")
    conn.attach(send)
    for n in (4, 5, 6):  # 4 arrives late, after the release; 5 and 6 are new
        conn.push("u:u", frame(n))
    conn.push("b", frame(1, "b"))  # no broadcast cursor: broadcasts are not filtered
    await asyncio.sleep(0.05)
    assert sent == ["welcome", frame(2), frame(3), frame(4), frame(5), frame(6), frame(1, "b")]


async def test_a_closed_connection_keeps_no_frames():
    """A socket closed while its streams were still held (it fell behind before its welcome, or its
    client left during set-up) keeps nothing pushed afterwards and is counted slow only once."""
    closed: list[int] = []

    async def close(code: int, reason: str) -> None:
        closed.append(code)

    metrics = Metrics("r")
    settings = Settings(jwt_secret=SECRET, send_queue_frames=5)  # type: ignore[arg-type]
    conn = Connection("u", 2e9, settings, metrics, close)
    conn.hold("u:u", "b")
    for n in range(1000):
        conn.push("b", build_frame(f"1000-{n}", '"e"', str(n), 1, frame_parts("b")))
    await asyncio.sleep(0.05)
    assert closed == [4008]
    assert metrics.registry.get_sample_value("notify_slow_consumers_total") == 1
    assert await conn.next_batch() == [], "nothing is held or queued for a closed socket"


@pytest.mark.slow
async def test_replica_killed_mid_stream_clients_lose_nothing(redis_server, http):
    """SIGKILL a replica while publishing: its clients resume on the other one and, end to end, lose nothing."""
    env = cluster_env(redis_server)
    with replicas(2, env) as (doomed, survivor):
        users = [uid("k") for _ in range(5)]
        total = 200
        accepted: dict[str, list[str]] = {u: [] for u in users}
        received: dict[str, list[str]] = {u: [] for u in users}

        async def follow(user: str) -> None:
            replica, cursor = doomed, None
            for _ in range(10):
                query = f"since={cursor}" if cursor else ""
                try:
                    async with websockets.connect(f"{replica.ws_url}?token={token(user)}&{query}") as ws:
                        async with asyncio.timeout(4 * TIMEOUT):
                            async for raw in ws:
                                frame = orjson.loads(raw)
                                if frame["type"] == "notification":
                                    received[user].append(frame["id"])
                                    cursor = frame["id"]
                                    if len(received[user]) == total:
                                        return
                except (ConnectionClosed, OSError):
                    pass
                replica = survivor
                cursor = cursor or "0-0"
                await asyncio.sleep(0.05)

        followers = [asyncio.create_task(follow(u)) for u in users]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=10) as pub:
            for n in range(total):
                if n == total // 3:
                    doomed.proc.kill()
                for user in users:
                    response = await publish(pub, survivor, user, "k", n)
                    assert response.status_code == 202
                    accepted[user].append(response.json()["id"])
        async with asyncio.timeout(6 * TIMEOUT):
            await asyncio.gather(*followers)
        for user in users:
            assert received[user] == accepted[user]


async def test_inbox_unread_and_read_marker(pair, http):
    """The inbox lists newest first with an unread count; acking moves the marker forward only."""
    a, b = pair
    user = uid()
    ids = [(await publish(http, a, user, "i", n)).json()["id"] for n in range(5)]
    me = {"Authorization": f"Bearer {token(user)}"}
    page = (await http.get(f"{b.url}/me/notifications", headers=me)).json()
    assert [n["id"] for n in page["notifications"]] == ids[::-1] and page["unread"] == 5
    assert page["notifications"][0]["event"] == "i" and page["notifications"][0]["data"] == 4
    older = (await http.get(f"{b.url}/me/notifications?limit=2&before={ids[3]}", headers=me)).json()
    assert [n["id"] for n in older["notifications"]] == [ids[2], ids[1]]
    read = await http.post(f"{a.url}/me/notifications/read", json={"up_to": ids[2]}, headers=me)
    assert read.json() == {"unread": 2}
    back = await http.post(f"{a.url}/me/notifications/read", json={"up_to": ids[0]}, headers=me)
    assert back.json() == {"unread": 2}, "the marker never moves backwards"
    via_query = await http.get(f"{b.url}/me/notifications?token={token(user)}")
    assert via_query.json()["unread"] == 2
    backend = (await http.get(f"{a.url}/users/{user}/notifications", headers=publisher_headers())).json()
    assert backend["unread"] == 2 and len(backend["notifications"]) == 5
    no_scope = await http.get(f"{a.url}/users/{user}/notifications", headers=publisher_headers(scope="notify:publish"))
    assert no_scope.status_code == 403
    bad = await http.post(f"{a.url}/me/notifications/read", json={"up_to": "x"}, headers=me)
    assert bad.status_code == 422


async def test_ack_on_one_device_updates_unread_on_another_replica(pair, http):
    """An ack frame on a phone (replica A) sends the new unread count to the laptop (replica B)."""
    a, b = pair
    user = uid()
    phone, laptop = await Client.connect(a, user), await Client.connect(b, user)
    await phone.welcome()
    await laptop.welcome()
    ids = [(await publish(http, a, user, "u", n)).json()["id"] for n in range(3)]
    await phone.notifications(3)
    await laptop.notifications(3)
    await phone.send({"type": "ack", "id": ids[1]})
    for device in (phone, laptop):
        assert await device.recv() == {"type": "unread", "count": 1}
    await phone.close()
    await laptop.close()


async def test_delivery_status_for_the_publisher(pair, http):
    """GET /notifications/{id}?user= tells the backend whether the user has read it."""
    a, b = pair
    user = uid()
    nid = (await publish(http, a, user, "s")).json()["id"]
    status = await http.get(f"{b.url}/notifications/{nid}", params={"user": user}, headers=publisher_headers())
    assert status.json() == {"id": nid, "user": user, "read": False, "retained": True, "fallback": "none", "push": None}
    await http.post(
        f"{a.url}/me/notifications/read", json={"up_to": nid}, headers={"Authorization": f"Bearer {token(user)}"}
    )
    status = await http.get(f"{b.url}/notifications/{nid}", params={"user": user}, headers=publisher_headers())
    assert status.json()["read"] is True
    missing = await http.get(
        f"{b.url}/notifications/99999999999999-1", params={"user": user}, headers=publisher_headers()
    )
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


async def test_idempotent_retry_across_replicas(pair, http):
    """A retry with the same Idempotency-Key on the other replica answers the first id and delivers once."""
    a, b = pair
    user = uid()
    client = await Client.connect(b, user)
    await client.welcome()
    headers = {**publisher_headers(), "Idempotency-Key": uid("key")}
    first = await publish(http, a, user, "once", headers=headers)
    retry = await publish(http, b, user, "once", headers=headers)
    assert retry.json()["id"] == first.json()["id"] and retry.json()["duplicate"] is True
    assert len(await client.notifications(1)) == 1
    await client.nothing(0.3)
    await client.close()


async def test_sse_receives_and_resumes_with_last_event_id(pair, http):
    """SSE streams notifications with id: set to the position of every stream it carries;
    reconnecting with Last-Event-ID resumes each of them without loss."""
    a, b = pair
    user = uid()
    url = f"{a.url}/events?token={token(user)}"
    reader = asyncio.create_task(sse_events(url, {}, 4))
    await asyncio.sleep(0.3)
    first = (await publish(http, b, user, "sse", 1)).json()["id"]
    second = (await publish(http, b, user, "sse", 2)).json()["id"]
    everyone = (await publish(http, b, None, "sse-all", 3)).json()["id"]
    events = await reader
    assert events[0]["data"]["type"] == "welcome"
    assert [e["id"].split(",")[0] for e in events[1:]] == [first, second, second]
    assert events[-1]["id"].split(",")[1] == everyone
    assert events[1]["data"]["event"] == "sse" and events[1]["data"]["data"] == 1
    missed = [(await publish(http, a, user, "sse", n)).json()["id"] for n in range(4, 7)]
    missed_broadcast = (await publish(http, a, None, "sse-all", 7)).json()["id"]
    resumed = await sse_events(f"{b.url}/events?token={token(user)}", {"Last-Event-ID": events[-1]["id"]}, 5)
    assert resumed[0]["data"]["recovered"] is True
    assert [e["data"]["id"] for e in resumed[1:]] == [*missed, missed_broadcast]
    assert resumed[-1]["id"] == f"{missed[-1]},{missed_broadcast}"


async def test_sse_rejects_a_bad_token(single, http):
    response = await http.get(f"{single.url}/events?token=bad")
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"


async def test_memory_broker_resumes_too(single, http):
    """The embedded broker keeps the same history: resume works on a single replica."""
    user = uid()
    seen = (await publish(http, single, user, "a")).json()["id"]
    missed = [(await publish(http, single, user, "b", n)).json()["id"] for n in range(3)]
    client = await Client.connect(single, user, f"since={seen}")
    assert (await client.welcome())["recovered"] is True
    assert [f["id"] for f in await client.notifications(3)] == missed
    await client.close()


@pytest.mark.parametrize("where", ["single", "pair"])
async def test_welcome_cursor_covers_a_drop_before_the_first_notification(where, request, http):
    """A client that saw nothing yet resumes from the welcome's cursor and misses nothing."""
    replica = request.getfixturevalue(where)
    replica = replica[0] if isinstance(replica, tuple) else replica
    user = uid("cur")
    client = await Client.connect(replica, user)
    cursor = (await client.welcome())["cursor"]
    await client.close()
    missed = (await publish(http, replica, user, "while-away")).json()["id"]
    again = await Client.connect(replica, user, f"since={cursor}&broadcast_since={cursor}")
    assert (await again.welcome())["recovered"] is True
    assert [f["id"] for f in await again.notifications(1)] == [missed]
    await again.close()


async def test_sse_streams_that_end_leave_nothing_registered(single, http):
    """Clients that open /events and leave, at once or after the welcome, leave no connection behind."""

    async def open_connections() -> float:
        text = (await http.get(single.url + "/metrics")).text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith("notify_connections ")))

    before = await open_connections()
    user = uid("sse-gone")
    for n in range(6):
        async with httpx.AsyncClient(timeout=TIMEOUT) as sse:
            async with sse.stream("GET", f"{single.url}/events?token={token(user)}") as response:
                if n % 2:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            break
    for _ in range(50):
        if await open_connections() == before:
            break
        await asyncio.sleep(0.05)
    assert await open_connections() == before
