"""A resume cursor ahead of its stream is none the service gave: it is not recovered, and the
live notifications that follow are all delivered, on both brokers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from .test_topics import NAMESPACES, connect, frame_of, join, topics_env, uid
from .utils import TIMEOUT, Client, Replica, publish, publisher_headers, started, token

# A day past now: no stream of this service has such an id yet.
AHEAD = f"{int(time.time() * 1000) + 86_400_000}-0"


@pytest.fixture(scope="module", params=["embedded", "redis"])
def where(request: pytest.FixtureRequest, redis_server: Any) -> Iterator[tuple[Replica, Replica]]:
    """Where to publish and where to connect: one embedded replica, or two replicas on one Redis."""
    if request.param == "embedded":
        with started(Replica({"NOTIFY_TOPICS": json.dumps(NAMESPACES)})) as (single,):
            yield single, single
    else:
        env = topics_env(redis_server)
        with started(Replica(env), Replica(env)) as (a, b):
            yield a, b


async def test_since_ahead_of_the_stream_is_not_recovered_and_live_messages_arrive(where, http):
    a, b = where
    user = uid("ahead")
    assert (await publish(http, a, user, "before")).status_code == 202
    client = await Client.connect(b, user, f"since={AHEAD}&broadcast_since={AHEAD}")
    assert (await client.welcome())["recovered"] is False
    sent = [(await publish(http, a, user, "live", n)).json()["id"] for n in range(3)]
    broadcast = (await publish(http, a, None, "live-broadcast")).json()["id"]
    assert [f["id"] for f in await client.notifications(4)] == [*sent, broadcast]
    await client.close()


async def test_topic_join_since_ahead_is_not_recovered_and_live_messages_arrive(where, http):
    a, b = where
    topic = f"chat:{uid('ahead')}"
    member = await connect(b, uid("member"))
    joined = await join(member, topic, since=AHEAD)
    assert joined["type"] == "joined" and joined["recovered"] is False
    sent = []
    for n in range(3):
        body = {"event": "live", "data": n}
        response = await http.post(f"{a.url}/topics/{topic}", json=body, headers=publisher_headers())
        assert response.status_code == 202
        sent.append(response.json()["id"])
    assert [(await frame_of(member, "notification"))["id"] for _ in sent] == sent
    await member.close()


async def test_sse_last_event_id_ahead_is_not_recovered_and_live_messages_arrive(where, http):
    a, b = where
    user = uid("ahead-sse")
    headers = {"Authorization": f"Bearer {token(user)}", "Last-Event-ID": f"{AHEAD},{AHEAD}"}
    sent: list[str] = []
    received: list[str] = []
    async with httpx.AsyncClient(timeout=None) as sse, sse.stream("GET", b.url + "/events", headers=headers) as stream:
        assert stream.status_code == 200
        async with asyncio.timeout(TIMEOUT):
            async for line in stream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                frame = orjson.loads(line[6:])
                if frame["type"] == "welcome":
                    assert frame["recovered"] is False
                    sent = [(await publish(http, a, user, "live", n)).json()["id"] for n in range(3)]
                elif frame["type"] == "notification":
                    received.append(frame["id"])
                    if len(received) == len(sent):
                        break
    assert received == sent
