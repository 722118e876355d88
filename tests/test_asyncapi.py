"""openapi/asyncapi.yaml describes what the running service really sends and accepts."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import cache
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
import websockets
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from service.core.frames import CloseCode

from .utils import ROOT, TIMEOUT, Client, RedisServer, Replica, cluster_env, publish, publisher_headers, token

SPEC_URI = "urn:notify:asyncapi"

# Namespaces of the replica the topic frames are observed on (`topical`).
NAMESPACES = {
    "chat": {"join": "any", "publish": True, "signals": True, "presence": True, "join_leave": True},
    "room": {"join": "token", "presence": True},
    "dash": {"join": "any"},
    "tiny": {"join": "any", "max_members": 1},
}
MAX_TOPICS = 3
ADMIN = publisher_headers(scope="notify:admin")
PUBLISHER = publisher_headers()


@cache
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "openapi" / "asyncapi.yaml").read_text())
    return loaded


@cache
def registry() -> Registry:
    return Registry().with_resource(SPEC_URI, Resource.from_contents(spec(), default_specification=DRAFT7))


def resolve(ref: str) -> Any:
    node: Any = spec()
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def deref(node: Any) -> Any:
    return resolve(node["$ref"]) if isinstance(node, dict) and "$ref" in node else node


def validator(schema_ref: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator({"$ref": f"{SPEC_URI}{schema_ref}"}, registry=registry())


def _payload_type(ref: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    message = deref(deref(ref))
    payload = deref(message["payload"])
    return payload.get("properties", {}).get("type", {}).get("const", message["name"]), message


def server_messages(channel: str = "socket") -> dict[str, dict[str, Any]]:
    """Messages the service sends on a channel (its `send` operations and replies), by `type`."""
    found: dict[str, dict[str, Any]] = {}
    for op in spec()["operations"].values():
        if op["channel"]["$ref"] != f"#/channels/{channel}":
            continue
        refs = op["messages"] if op["action"] == "send" else op.get("reply", {}).get("messages", [])
        found.update(_payload_type(ref) for ref in refs)
    return found


def client_messages() -> dict[str, dict[str, Any]]:
    """Messages the service accepts on the socket (its `receive` operations), by `type`."""
    found: dict[str, dict[str, Any]] = {}
    for op in spec()["operations"].values():
        if op["action"] == "receive" and op["channel"]["$ref"] == "#/channels/socket":
            found.update(_payload_type(ref) for ref in op["messages"])
    return found


def check_server_frame(frame: dict[str, Any], channel: str = "socket") -> None:
    """The frame matches the schema of the message with its `type`, and no other message's."""
    messages = server_messages(channel)
    assert frame.get("type") in messages, f"frame type {frame.get('type')!r} is not in the spec: {frame}"
    ref = messages[frame["type"]]["payload"]["$ref"]
    errors = [e.message for e in validator(ref).iter_errors(frame)]
    assert not errors, f"{frame} does not match {ref}: {errors}"
    others = [t for t, m in messages.items() if t != frame["type"] and validator(m["payload"]["$ref"]).is_valid(frame)]
    assert not others, f"{frame} also matches {others}"


def error_codes_described() -> str:
    return str(deref(spec()["components"]["schemas"]["Error"])["properties"]["code"]["description"])


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Frames:
    """A client whose frames are kept until taken, so a test can wait for one kind while others
    (a topic message before its `published`, a presence change) arrive in any order; every frame
    read is also appended to `seen`, to be checked against the spec."""

    def __init__(self, client: Client, seen: list[dict[str, Any]]) -> None:
        self.client = client
        self.seen = seen
        self.pending: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, replica: Replica, user: str, seen: list[dict[str, Any]]) -> Frames:
        frames = cls(await Client.connect(replica, user), seen)
        await frames.take("welcome")
        return frames

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.client.send(frame)

    async def take(self, kind: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The first frame of `kind` with these fields; an unexpected error frame fails the test."""
        async with asyncio.timeout(timeout):
            while True:
                for frame in self.pending:
                    if frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items()):
                        self.pending.remove(frame)
                        return frame
                frame = await self.client.recv(timeout)
                self.seen.append(frame)
                assert frame["type"] != "error" or kind == "error", f"waiting for {kind} {fields}, got {frame}"
                self.pending.append(frame)

    async def closed(self) -> int | None:
        """Read until the server closes the socket; its close code."""
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                self.seen.append(await self.client.recv())
        return self.client.ws.close_code

    async def close(self) -> None:
        await self.client.close()


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str | None, str | None, dict[str, Any]]]:
    """(event name, id, data) of every event of a Server-Sent Events response."""
    event: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            event["data"] = orjson.loads(line[6:])
        elif line.startswith("id: "):
            event["id"] = line[4:]
        elif line.startswith("event: "):
            event["event"] = line[7:]
        elif line == "" and "data" in event:
            yield event.get("event"), event.get("id"), event["data"]
            event = {}


def check_position(id_: str) -> list[str]:
    """An SSE `id:` matches the spec's SsePosition; its places."""
    errors = [e.message for e in validator("#/components/schemas/SsePosition").iter_errors(id_)]
    assert not errors, (id_, errors)
    return id_.split(",")


@pytest.fixture(scope="module")
def topical(redis_server: RedisServer) -> Iterator[Replica]:
    """A replica on Redis (whose Lua scripts build the topic frames) with topic namespaces configured."""
    env = cluster_env(
        redis_server,
        NOTIFY_TOPICS=json.dumps(NAMESPACES),
        NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS="0.2",
        NOTIFY_MAX_TOPICS_PER_CONNECTION=str(MAX_TOPICS),
    )
    replica = Replica(env).start()
    yield replica
    replica.stop()


# ---- the document itself


def test_document_is_asyncapi_3_and_every_ref_resolves():
    document = spec()
    assert document["asyncapi"].startswith("3.0")
    assert {"socket", "events"} <= set(document["channels"])
    assert document["channels"]["socket"]["address"] == "/ws"
    assert document["channels"]["events"]["address"] == "/events"

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft7Validator.check_schema(schema)


def test_every_example_matches_its_payload_schema():
    for name, message in spec()["components"]["messages"].items():
        assert message.get("examples"), f"message {name} has no example"
        for example in message["examples"]:
            errors = [e.message for e in validator(message["payload"]["$ref"]).iter_errors(example["payload"])]
            assert not errors, (name, errors)
    for name, schema in spec()["components"]["schemas"].items():
        for example in schema.get("examples", []):
            assert validator(f"#/components/schemas/{name}").is_valid(example), (name, example)


def test_close_codes_and_resume_parameters_are_described():
    socket = spec()["channels"]["socket"]
    described = {entry["code"] for entry in socket["x-close-codes"]}
    assert {int(code) for code in CloseCode} | {1011} <= described
    query = deref(socket["bindings"]["ws"]["query"])["properties"]
    assert {"token", "since", "broadcast_since"} <= set(query)
    events_query = deref(spec()["operations"]["sendEvents"]["bindings"]["http"]["query"])["properties"]
    assert {"token", "since", "topics"} <= set(events_query)
    assert set(deref(spec()["components"]["schemas"]["SseClose"])["properties"]["code"]["enum"]) >= {
        int(code) for code in CloseCode
    }


def test_every_error_code_the_server_can_send_is_described():
    """Every code the service's source can put in an error frame is named in the spec and in docs/protocol.md."""
    raised = re.compile(r'(?:\bBadFrame|\bTopicError|(?<![\w.])error)\(\s*"([a-z_]+)"')
    codes = {code for path in (ROOT / "service").rglob("*.py") for code in raised.findall(path.read_text())}
    assert {"invalid_json", "unknown_type", "invalid_cursor", "forbidden", "full", "invalid_topic"} <= codes, codes
    protocol = (ROOT / "docs" / "protocol.md").read_text()
    assert not [code for code in codes if f"`{code}`" not in error_codes_described()], codes
    assert not [code for code in codes if f"`{code}`" not in protocol], codes


# ---- frames the running service sends


async def test_socket_frames_match_the_spec(single, http):
    """welcome (plain, recovered true/false), notification, broadcast, pong, error, unread, refreshed."""
    seen: list[dict[str, Any]] = []
    client = await Client.connect(single, "spec-alice")
    first_welcome = await client.welcome()
    assert {"cursor", "broadcast_cursor"} <= set(first_welcome)
    seen.append(first_welcome)
    response = await publish(http, single, "spec-alice", "order.shipped", {"n": 1, "nested": [None, "x"]})
    first_id = response.json()["id"]
    seen += await client.notifications(1)
    assert (await publish(http, single, None, "maintenance")).status_code == 202
    [broadcast] = await client.notifications(1)
    assert broadcast["broadcast"] is True
    seen.append(broadcast)

    await client.send({"type": "ping"})
    seen.append(await client.recv())
    for bad in (
        "not json",
        "[1]",
        {"type": "nope"},
        {"type": "ack"},
        {"type": "refresh", "token": "x"},
        {"type": "refresh", "token": token("someone-else")},
    ):
        await client.send(bad)
        frame = await client.recv()
        assert frame["type"] == "error", frame
        seen.append(frame)
    await client.ws.send(b"\x00binary")
    seen.append(await client.recv())
    await client.send({"type": "ack", "id": first_id})
    unread = await client.recv()
    assert unread == {"type": "unread", "count": 0}
    seen.append(unread)
    await client.send({"type": "refresh", "token": token("spec-alice", ttl=7200)})
    refreshed = await client.recv()
    assert refreshed["type"] == "refreshed"
    seen.append(refreshed)
    await client.close()

    # One cursor per stream: the last user notification, and the broadcast stream's own cursor.
    query = f"since={first_id}&broadcast_since={first_welcome['broadcast_cursor']}"
    resumed = await Client.connect(single, "spec-alice", query=query)
    welcome = await resumed.welcome()
    assert welcome["recovered"] is True
    seen.append(welcome)
    replayed = await resumed.notifications(1)
    assert replayed[0]["id"] == broadcast["id"]
    await resumed.close()

    bad_cursor = await Client.connect(single, "spec-alice", query="since=yesterday")
    welcome = await bad_cursor.welcome()
    assert welcome["recovered"] is False
    seen.append(welcome)
    cursor_error = await bad_cursor.recv()
    assert cursor_error["code"] == "invalid_cursor"
    seen.append(cursor_error)
    await bad_cursor.close()

    for frame in seen:
        check_server_frame(frame)
    kinds = {frame["type"] for frame in seen}
    assert kinds == {"welcome", "notification", "pong", "error", "unread", "refreshed"}
    codes = {frame["code"] for frame in seen if frame["type"] == "error"}
    assert codes == {
        "invalid_json",
        "invalid_frame",
        "unknown_type",
        "invalid_id",
        "invalid_token",
        "binary_not_supported",
        "invalid_cursor",
    }
    for code in codes:  # every error code the server sent is named in the spec
        assert f"`{code}`" in error_codes_described()


async def test_topic_frames_match_the_spec(topical, http):
    """joined (fresh, resumed), topic notifications (from a member and from a backend), published,
    signal, presence, members, left (and removed), the topic error codes, and the 4403 close."""
    seen: list[dict[str, Any]] = []
    lobby, tiny, room = f"chat:{uid('lobby')}", f"tiny:{uid('t')}", f"room:{uid('r')}"
    dash = [f"dash:{uid('d')}" for _ in range(3)]
    alice_id, bob_id, carol_id = uid("spec-alice"), uid("spec-bob"), uid("spec-carol")
    alice = await Frames.connect(topical, alice_id, seen)
    bob = await Frames.connect(topical, bob_id, seen)
    carol = await Frames.connect(topical, carol_id, seen)

    await alice.send({"type": "join", "topic": lobby})
    joined = await alice.take("joined")
    assert joined["count"] == 1 and "cursor" in joined and "recovered" not in joined, joined
    await bob.send({"type": "join", "topic": lobby, "since": joined["cursor"]})
    rejoined = await bob.take("joined")
    assert rejoined["recovered"] is True and rejoined["count"] == 2, rejoined
    announced = await alice.take("presence")
    if announced["joined"] == [alice_id]:  # her own join, announced before bob's
        announced = await alice.take("presence")
    assert announced == {
        "type": "presence",
        "topic": lobby,
        "joined": sorted([alice_id, bob_id]),
        "left": [],
        "count": 2,
    } or announced == {"type": "presence", "topic": lobby, "joined": [bob_id], "left": [], "count": 2}

    await alice.send({"type": "publish", "topic": lobby, "event": "msg", "data": {"text": "hi", "n": [1, None]}})
    published = await alice.take("published")
    assert published["topic"] == lobby
    for member in (alice, bob):
        message = await member.take("notification", id=published["id"])
        assert message["topic"] == lobby and message["from"] == alice_id, message
        assert message["data"] == {"text": "hi", "n": [1, None]}
    response = await http.post(
        f"{topical.url}/topics/{lobby}", json={"event": "announcement", "data": None}, headers=PUBLISHER
    )
    assert response.status_code == 202, response.text
    from_backend = await bob.take("notification", id=response.json()["id"])
    assert from_backend["topic"] == lobby and "from" not in from_backend

    await bob.send({"type": "signal", "topic": lobby, "event": "typing", "data": True})
    signal = await alice.take("signal")
    assert signal == {"type": "signal", "topic": lobby, "event": "typing", "data": True, "from": bob_id}
    await alice.send({"type": "presence", "topic": lobby})
    assert await alice.take("members") == {
        "type": "members",
        "topic": lobby,
        "users": sorted([alice_id, bob_id]),
        "count": 2,
    }
    # A topic token for exactly this user and topic opens a namespace that needs one.
    await bob.send({"type": "join", "topic": room, "token": token(bob_id, topic=room)})
    assert (await bob.take("joined", topic=room))["count"] == 1
    await alice.send({"type": "join", "topic": tiny})
    await alice.take("joined", topic=tiny)

    # Refusals: each error names the topic of the frame it answers.
    refusals: list[tuple[Frames, dict[str, Any], str]] = [
        (carol, {"type": "publish", "topic": lobby, "event": "msg"}, "forbidden"),  # not a member
        (carol, {"type": "join", "topic": room}, "forbidden"),  # no grant, no topic token
        (carol, {"type": "join", "topic": room, "token": token(bob_id, topic=room)}, "forbidden"),  # bob's token
        (carol, {"type": "join", "topic": "nowhere:x"}, "unknown_namespace"),
        (carol, {"type": "join", "topic": "no spaces"}, "invalid_topic"),
        (carol, {"type": "join", "topic": lobby, "since": "yesterday"}, "invalid_cursor"),
        (carol, {"type": "join", "topic": tiny}, "full"),
        (carol, {"type": "join", "topic": dash[0]}, ""),
        (carol, {"type": "join", "topic": dash[0]}, "already_joined"),
        (carol, {"type": "publish", "topic": dash[0], "event": "msg"}, "forbidden"),  # publish is off
        (carol, {"type": "signal", "topic": dash[0], "event": "typing"}, "forbidden"),  # signals are off
        (carol, {"type": "presence", "topic": dash[0]}, "forbidden"),  # presence is off
        (carol, {"type": "join", "topic": lobby}, ""),
        (carol, {"type": "publish", "topic": lobby, "event": ""}, "invalid_frame"),
        (carol, {"type": "join", "topic": dash[1]}, ""),
        (carol, {"type": "join", "topic": dash[2]}, "too_many_topics"),
    ]
    for client, frame, code in refusals:
        await client.send(frame)
        if not code:
            await client.take("joined", topic=frame["topic"])
            continue
        refused = await client.take("error")
        assert refused["code"] == code and refused["topic"] == frame["topic"], (frame, refused)

    await bob.send({"type": "leave", "topic": lobby})
    assert await bob.take("left", topic=lobby) == {"type": "left", "topic": lobby}
    response = await http.delete(f"{topical.url}/topics/{lobby}/members/{carol_id}", headers=ADMIN)
    assert response.status_code == 202, response.text
    assert await carol.take("left", topic=lobby) == {"type": "left", "topic": lobby, "reason": "removed"}
    # Bob's leave and carol's removal, in one announcement or two; carol joined within the same
    # interval as her removal, and a join and a leave within one interval cancel out.
    gone: list[str] = []
    while bob_id not in gone or announced["count"] != 1:
        announced = await alice.take("presence", timeout=3 * TIMEOUT)
        assert announced["topic"] == lobby and set(announced["joined"]) <= {carol_id}, announced
        gone += announced["left"]
    assert set(gone) <= {bob_id, carol_id}

    response = await http.post(f"{topical.url}/users/{alice_id}/disconnect", headers=ADMIN)
    assert response.status_code == 202, response.text
    code = await alice.closed()
    assert code == CloseCode.DISCONNECTED
    assert code in {entry["code"] for entry in spec()["channels"]["socket"]["x-close-codes"]}
    await bob.close()
    await carol.close()

    for frame in seen:
        check_server_frame(frame)
    kinds = {frame["type"] for frame in seen}
    assert {"joined", "notification", "published", "signal", "presence", "members", "left", "error"} <= kinds
    codes = {frame["code"] for frame in seen if frame["type"] == "error"}
    assert codes == {code for _, _, code in refusals if code}
    for code in codes:
        assert f"`{code}`" in error_codes_described()


async def test_sse_events_match_the_spec(single, http):
    """Over /events: welcome, notifications with `id:` positions, and `event: close` when the token expires."""
    events: list[tuple[str | None, str | None, dict[str, Any]]] = []
    url = f"{single.url}/events?token={token('spec-sse', ttl=1.5)}"
    async with asyncio.timeout(3 * TIMEOUT), httpx.AsyncClient(timeout=TIMEOUT) as sse:
        async with sse.stream("GET", url) as response:
            assert response.status_code == 200
            async for event in sse_events(response):
                events.append(event)
                if len(events) == 1:
                    assert (await publish(http, single, "spec-sse", "e", {"k": 1})).status_code == 202
    kinds = [(name, data.get("type")) for name, _, data in events]
    assert kinds == [(None, "welcome"), (None, "notification"), ("close", None)], events
    for name, id_, data in events:
        if name == "close":
            errors = [e.message for e in validator("#/components/schemas/SseClose").iter_errors(data)]
            assert not errors and data["code"] == 4401
            continue
        check_server_frame(data, "events")
        assert id_ is not None
        user, broadcast = check_position(id_)  # no topics: the user's and the broadcast stream
        if data["type"] == "welcome":
            assert (user, broadcast) == (data["cursor"], data["broadcast_cursor"])
        else:
            assert user == data["id"]


async def test_sse_topic_events_match_the_spec(topical, http):
    """Over /events with `topics`: joined events, topic notifications with their place in `id:`,
    and `event: close` with 4403 when the user is disconnected."""
    user = uid("spec-sse")
    topics = [f"chat:{uid('a')}", f"chat:{uid('b')}"]
    events: list[tuple[str | None, str | None, dict[str, Any]]] = []
    url = f"{topical.url}/events?token={token(user)}&topics={','.join(topics)}"
    async with asyncio.timeout(4 * TIMEOUT), httpx.AsyncClient(timeout=TIMEOUT) as sse:
        async with sse.stream("GET", url) as response:
            assert response.status_code == 200
            async for event in sse_events(response):
                events.append(event)
                kinds = [data.get("type") for _, _, data in events]
                if kinds == ["welcome", "joined", "joined"]:
                    message = {"event": "msg", "data": 1}
                    answer = await http.post(f"{topical.url}/topics/{topics[1]}", json=message, headers=PUBLISHER)
                    assert answer.status_code == 202, answer.text
                    assert (await publish(http, topical, user, "e")).status_code == 202
                elif kinds.count("notification") == 2:
                    answer = await http.post(f"{topical.url}/users/{user}/disconnect", headers=ADMIN)
                    assert answer.status_code == 202, answer.text
    name, _, close = events[-1]
    assert name == "close" and close == {"code": CloseCode.DISCONNECTED}
    assert validator("#/components/schemas/SseClose").is_valid(close)
    kinds = sorted(str(data.get("type")) for _, _, data in events[:-1])
    assert kinds == ["joined", "joined", "notification", "notification", "welcome"], events
    for _, id_, data in events[:-1]:
        check_server_frame(data, "events")
        assert id_ is not None, data
        places = check_position(id_)
        assert len(places) == 2 + len(topics)
        if data["type"] == "joined":
            assert places[2 + topics.index(data["topic"])] == data.get("cursor", "")
        elif data["type"] == "notification" and "topic" in data:
            assert places[2 + topics.index(data["topic"])] == data["id"]
        elif data["type"] == "notification":
            assert places[0] == data["id"]


@pytest.mark.slow
async def test_resync_frame_matches_the_spec():
    """A Redis that restarts (and so lost the history to replay from) makes the replica send resync."""
    redis = RedisServer()
    redis.start()
    replica = Replica(cluster_env(redis, NOTIFY_RECONNECT_MAX_SECONDS="0.5")).start()
    try:
        client = await Client.connect(replica, "spec-resync")
        await client.welcome()
        redis.kill()
        redis.start()
        frame = await client.recv(timeout=4 * TIMEOUT)
        assert frame["type"] == "resync", frame
        check_server_frame(frame)
        await client.close()
    finally:
        replica.stop()
        redis.stop()


# ---- frames the running service accepts


async def test_every_client_frame_the_server_accepts_is_described(topical, http):
    described = client_messages()
    user = uid("spec-bob")
    seen: list[dict[str, Any]] = []
    client = await Frames.connect(topical, user, seen)
    # The server names the frame types it accepts when it refuses one.
    await client.send({"type": "undescribed"})
    refusal = await client.take("error")
    assert refusal["code"] == "unknown_type"
    expected = re.search(r"expected (.+)$", refusal["message"])
    assert expected is not None, refusal
    accepted = set(re.split(r", | or ", expected.group(1)))
    assert accepted == set(described), (accepted, set(described))

    # Each described example (with live values) is accepted: answered as the spec says, never with error.
    id_ = (await publish(http, topical, user, "e")).json()["id"]
    await client.take("notification", id=id_)
    topic = f"chat:{uid('spec')}"
    live: dict[str, dict[str, Any]] = {"ack": {"id": id_}, "refresh": {"token": token(user)}}
    replies = {
        "ping": "pong",
        "ack": "unread",
        "refresh": "refreshed",
        "join": "joined",
        "publish": "published",
        "signal": None,  # no answer: it goes to the other members
        "presence": "members",
        "leave": "left",
    }
    order = ["ping", "ack", "refresh", "join", "publish", "signal", "presence", "leave"]
    assert set(order) == set(described)
    for kind in order:
        message = described[kind]
        for index, example in enumerate(message["examples"]):
            frame = {**example["payload"], **live.get(kind, {})}
            if "topic" in frame:
                # The first join is into `topic`, where the other topic frames then go; further
                # join examples each join a topic of their own.
                frame["topic"] = topic if kind != "join" or index == 0 else f"{topic}-{index}"
            if "since" in frame:
                frame["since"] = f"{int(time.time() * 1000) - 1000}-0"
            if "token" in frame and kind == "join":
                frame["token"] = token(user, topic=frame["topic"])
            assert validator(message["payload"]["$ref"]).is_valid(frame)
            await client.send(frame)
            if replies[kind] is None:
                await client.send({"type": "ping"})
                await client.take("pong")
                continue
            answer = await client.take(str(replies[kind]))
            if "topic" in frame:
                assert answer["topic"] == frame["topic"], (frame, answer)
    await client.close()
    for frame in seen:
        check_server_frame(frame)
    assert not [frame for frame in seen if frame["type"] == "error" and frame["code"] != "unknown_type"], seen
