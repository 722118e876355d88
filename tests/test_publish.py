"""The publish API on one replica: status codes, error bodies, batch and idempotency."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest

from .utils import Client, publish, publisher_headers, token


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_notify_answers_202_with_id_ts_and_online(single, http):
    """202 carries the id, the publish time and how many sockets of the user are online."""
    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    response = await publish(http, single, user, "e", {"k": "v"})
    assert response.status_code == 202
    body = response.json()
    assert body["online"] == 1 and body["duplicate"] is False
    assert isinstance(body["id"], str) and isinstance(body["ts"], int)
    await client.close()


@pytest.mark.parametrize(
    "headers, status, error",
    [
        ({}, 401, "invalid_token"),
        ({"Authorization": "Bearer nonsense"}, 401, "invalid_token"),
        ({"Authorization": f"Bearer {token('svc', 'notify:publish', ttl=-5)}"}, 401, "invalid_token"),
        ({"Authorization": f"Bearer {token('svc')}"}, 403, "missing_scope"),
        ({"Authorization": f"Bearer {token('svc', 'notify:read')}"}, 403, "missing_scope"),
    ],
)
async def test_publish_auth_failures(single, http, headers, status, error):
    """No or bad token is 401, a token without notify:publish is 403; both explain themselves in JSON."""
    for path in ("/notify/alice", "/broadcast"):
        response = await http.post(single.url + path, json={"event": "e"}, headers=headers)
        assert response.status_code == status
        assert response.json()["error"] == error and response.json()["message"]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"data": 1},
        {"event": ""},
        {"event": 5},
        {"event": "e", "unexpected": True},
        {"event": "x" * 129},
        [1, 2],
    ],
)
async def test_bad_body_is_422_with_message(single, http, body):
    """A body that breaks the contract is 422 with a message naming the field."""
    response = await http.post(single.url + "/notify/alice", json=body, headers=publisher_headers())
    assert response.status_code == 422
    payload = response.json()
    assert payload["error"] == "invalid_request" and payload["message"]


async def test_invalid_json_is_422(single, http):
    """A body that is not JSON is 422, not a 500."""
    response = await http.post(
        single.url + "/notify/alice",
        content=b"{nope",
        headers={**publisher_headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 422


@pytest.mark.parametrize("user", ["with space", "tab\there", "x" * 257, "nl\n", "del\x7f"])
async def test_invalid_user_ids_are_422(single, http, user):
    """User ids with whitespace or control characters, or over 256 characters, are refused."""
    response = await http.post(
        single.url + "/notify/" + quote(user, safe=""), json={"event": "e"}, headers=publisher_headers()
    )
    assert response.status_code == 422, response.text


async def test_body_over_limit_is_413(single, http):
    """A body over NOTIFY_MAX_PAYLOAD_BYTES (65536) is refused with 413 before parsing."""
    big = {"event": "e", "data": "x" * 70000}
    response = await http.post(single.url + "/notify/alice", json=big, headers=publisher_headers())
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"

    async def chunks():
        for part in (b'{"event":"e","data":"', b"y" * 70000, b'"}'):
            yield part

    chunked = await http.post(
        single.url + "/broadcast",
        content=chunks(),
        headers={**publisher_headers(), "Content-Type": "application/json"},
    )
    assert chunked.status_code == 413


async def test_unknown_route_is_json_404(single, http):
    response = await http.get(single.url + "/nope")
    assert response.status_code == 404 and response.json()["error"] == "not_found"


async def test_idempotent_retry_delivers_once(single, http):
    """A retry with the same Idempotency-Key answers the first id and delivers nothing again."""
    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    headers = {**publisher_headers(), "Idempotency-Key": "order-7-shipped"}
    first = await publish(http, single, user, "shipped", {"n": 7}, headers=headers)
    second = await publish(http, single, user, "shipped", {"n": 7}, headers=headers)
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"] and second.json()["duplicate"] is True
    [frame] = await client.notifications(1)
    assert frame["id"] == first.json()["id"]
    await client.nothing()
    other = await publish(
        http,
        single,
        user,
        "shipped",
        {"n": 7},
        headers={**publisher_headers("other-backend"), "Idempotency-Key": "order-7-shipped"},
    )
    assert other.json()["id"] != first.json()["id"], "keys are scoped per publisher"
    await client.close()


async def test_batch_publish_reports_each_item(single, http):
    """POST /notify with a list publishes each item and answers one result per item, in order."""
    users = [uid("b"), uid("b")]
    clients = [await Client.connect(single, u) for u in users]
    for c in clients:
        await c.welcome()
    body = [
        {"user": users[0], "event": "a", "data": 1},
        {"user": users[1], "event": "b", "data": 2},
        {"user": users[0], "event": "c", "data": "x" * 70000},
    ]
    response = await http.post(single.url + "/notify", json=body, headers=publisher_headers())
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["status"] for r in results] == [202, 202, 413]
    assert [f["event"] for f in await clients[0].notifications(1)] == ["a"]
    assert [f["event"] for f in await clients[1].notifications(1)] == ["b"]
    too_many = await http.post(single.url + "/notify", json=[body[0]] * 501, headers=publisher_headers())
    assert too_many.status_code == 422
    for c in clients:
        await c.close()


async def test_batch_retry_with_idempotency_key_delivers_once(single, http):
    """A batch retried with the same Idempotency-Key answers the first ids and delivers nothing twice."""
    user = uid("bi")
    client = await Client.connect(single, user)
    await client.welcome()
    body = [{"user": user, "event": "a", "data": 1}, {"user": user, "event": "b", "data": 2}]
    headers = {**publisher_headers(), "Idempotency-Key": uid("batch")}
    first = (await http.post(single.url + "/notify", json=body, headers=headers)).json()["results"]
    again = (await http.post(single.url + "/notify", json=body, headers=headers)).json()["results"]
    assert [r["id"] for r in again] == [r["id"] for r in first] and all(r["duplicate"] for r in again)
    assert [f["event"] for f in await client.notifications(2)] == ["a", "b"]
    await client.nothing()
    await client.close()
