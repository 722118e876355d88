"""End-to-end: a socket receives what a backend publishes."""

from __future__ import annotations

from .utils import Client, publish


async def test_socket_receives_notification(single, http):
    """A notification posted for alice arrives on her socket with the contract's fields."""
    client = await Client.connect(single, "alice")
    welcome = await client.welcome()
    assert welcome["user"] == "alice"
    response = await publish(http, single, "alice", "order.shipped", {"n": 1})
    assert response.status_code == 202
    [frame] = await client.notifications(1)
    assert frame["id"] == response.json()["id"]
    assert frame["event"] == "order.shipped" and frame["data"] == {"n": 1}
    await client.close()


async def test_cross_replica(pair, http):
    """A notification posted to replica A reaches a socket on replica B."""
    a, b = pair
    client = await Client.connect(b, "bob")
    await client.welcome()
    response = await publish(http, a, "bob", "x", [1])
    assert response.status_code == 202, response.text
    [frame] = await client.notifications(1)
    assert frame["data"] == [1]
    await client.close()
