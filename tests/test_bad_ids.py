"""A user id that cannot be written (a lone surrogate) is refused like any invalid id, and one bad
stream never keeps a replica from subscribing the others."""

from __future__ import annotations

import httpx
import pytest
import websockets

from .test_faults import is_ready, wait_for
from .utils import TIMEOUT, Client, Replica, cluster_env, publish, publisher_headers, started, token

LONE_SURROGATE = "bad-\ud800"


async def test_lone_surrogate_user_id_is_refused_and_the_replica_stays_whole(own_redis, http):
    """A token whose `sub` holds a lone surrogate is refused at the WebSocket handshake (4401) and
    over SSE (401), and in the REST bodies that name users (422); after a subscription blip the
    replica is ready again and still delivers what the other replica publishes."""
    env = cluster_env(own_redis)
    with started(Replica(env), Replica(env)) as (a, b):
        bad = token(LONE_SURROGATE)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with websockets.connect(f"{b.ws_url}?token={bad}", open_timeout=TIMEOUT) as ws:
                await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        sse = await http.get(b.url + "/events", headers={"Authorization": f"Bearer {bad}"})
        assert sse.status_code == 401 and sse.json()["error"] == "invalid_token"
        batch = await http.post(
            a.url + "/notify",
            content=b'[{"user": "bad-\\ud800", "event": "e"}]',
            headers={**publisher_headers(), "Content-Type": "application/json"},
        )
        assert batch.status_code == 422 and set(batch.json()) >= {"error", "message"}

        alice = await Client.connect(b, "surrogate-neighbour")
        await alice.welcome()
        own_redis.command("CLIENT", "KILL", "TYPE", "pubsub")
        await wait_for(lambda: _not_ready_or_ready(http, b), TIMEOUT)
        await wait_for(lambda: is_ready(http, b), 3 * TIMEOUT)
        sent = await publish(http, a, "surrogate-neighbour", "after-blip")
        assert sent.status_code == 202
        [frame] = await alice.notifications(1, timeout=2 * TIMEOUT)
        assert frame["id"] == sent.json()["id"]
        await alice.close()


async def _not_ready_or_ready(http: httpx.AsyncClient, replica: Replica) -> bool:
    """Any answer at all: the replica is alive (the blip's 503 may already be over)."""
    response = await http.get(replica.url + "/readyz")
    return response.status_code in (200, 503)
