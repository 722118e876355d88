"""openapi/asyncapi.yaml describes what the running service really sends and accepts."""

from __future__ import annotations

import asyncio
import re
from functools import cache
from typing import Any

import httpx
import jsonschema
import orjson
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from service.frames import CloseCode

from .utils import ROOT, TIMEOUT, Client, RedisServer, Replica, cluster_env, publish, token

SPEC_URI = "urn:notify:asyncapi"


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


def test_close_codes_and_resume_parameters_are_described():
    socket = spec()["channels"]["socket"]
    described = {entry["code"] for entry in socket["x-close-codes"]}
    assert {int(code) for code in CloseCode} | {1011} <= described
    query = deref(socket["bindings"]["ws"]["query"])["properties"]
    assert {"token", "since", "broadcast_since"} <= set(query)
    assert set(deref(spec()["components"]["schemas"]["SseClose"])["properties"]["code"]["enum"]) >= {
        int(code) for code in CloseCode
    }


# ---- frames the running service sends


async def test_socket_frames_match_the_spec(single, http):
    """welcome (plain, recovered true/false), notification, broadcast, pong, error, unread, refreshed."""
    seen: list[dict[str, Any]] = []
    client = await Client.connect(single, "spec-alice")
    seen.append(await client.welcome())
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

    resumed = await Client.connect(single, "spec-alice", query=f"since={first_id}&broadcast_since={first_id}")
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
        assert f"`{code}`" in deref(spec()["components"]["schemas"]["Error"])["properties"]["code"]["description"]


async def test_sse_events_match_the_spec(single, http):
    """Over /events: welcome, notifications with `id:`, and `event: close` when the token expires."""
    events: list[tuple[str | None, str | None, dict[str, Any]]] = []
    url = f"{single.url}/events?token={token('spec-sse', ttl=1.5)}"
    async with asyncio.timeout(3 * TIMEOUT), httpx.AsyncClient(timeout=TIMEOUT) as sse:
        async with sse.stream("GET", url) as response:
            assert response.status_code == 200
            published = False
            event: dict[str, Any] = {}
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    event["data"] = orjson.loads(line[6:])
                elif line.startswith("id: "):
                    event["id"] = line[4:]
                elif line.startswith("event: "):
                    event["event"] = line[7:]
                elif line == "" and "data" in event:
                    events.append((event.get("event"), event.get("id"), event["data"]))
                    event = {}
                    if not published:
                        published = True
                        assert (await publish(http, single, "spec-sse", "e", {"k": 1})).status_code == 202
    kinds = [(name, data.get("type")) for name, _, data in events]
    assert kinds == [(None, "welcome"), (None, "notification"), ("close", None)], events
    for name, id_, data in events:
        if name == "close":
            errors = [e.message for e in validator("#/components/schemas/SseClose").iter_errors(data)]
            assert not errors and data["code"] == 4401
        else:
            check_server_frame(data, "events")
            if data["type"] == "notification":
                assert id_ == data["id"]


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


async def test_every_client_frame_the_server_accepts_is_described(single, http):
    described = client_messages()
    client = await Client.connect(single, "spec-bob")
    await client.welcome()
    # The server names the frame types it accepts when it refuses one.
    await client.send({"type": "undescribed"})
    refusal = await client.recv()
    assert refusal["code"] == "unknown_type"
    expected = re.search(r"expected (.+)$", refusal["message"])
    assert expected is not None, refusal
    accepted = set(re.split(r", | or ", expected.group(1)))
    assert accepted == set(described), (accepted, set(described))

    # Each described example (with live values) is accepted: answered as the spec says, never with error.
    id_ = (await publish(http, single, "spec-bob", "e")).json()["id"]
    await client.notifications(1)
    live = {"ack": {"id": id_}, "refresh": {"token": token("spec-bob")}}
    replies = {"ping": "pong", "ack": "unread", "refresh": "refreshed"}
    for kind, message in described.items():
        for example in message["examples"]:
            frame = {**example["payload"], **live.get(kind, {})}
            assert validator(message["payload"]["$ref"]).is_valid(frame)
            await client.send(frame)
            answer = await client.recv()
            assert answer["type"] == replies[kind], (frame, answer)
            check_server_frame(answer)
    await client.close()
