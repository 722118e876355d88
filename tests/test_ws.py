"""The client socket on one replica: handshake, auth failures, frames, isolation and order."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .utils import TIMEOUT, Client, Replica, publish, token


def uid(prefix: str = "w") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def closed_with(url: str, **kwargs) -> tuple[int, str, list[str]]:
    """Connect, collect every frame until the server closes; the close code, reason and frames."""
    frames: list[str] = []
    async with websockets.connect(url, open_timeout=TIMEOUT, **kwargs) as ws:
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    frames.append(await ws.recv())
        except ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason, frames
    raise AssertionError("not closed")


async def test_welcome_is_the_first_frame(single):
    """On accept the server first sends welcome with the user and a connection id."""
    user = uid()
    client = await Client.connect(single, user)
    frame = await client.recv()
    assert frame["type"] == "welcome" and frame["user"] == user and frame["connection_id"]
    assert "recovered" not in frame
    await client.close()


@pytest.mark.parametrize(
    "query, reason",
    [
        ("", "missing token"),
        ("?token=garbage", "malformed"),
        (f"?token={token('alice', ttl=-30)}", "expired"),
        (f"?token={token(None)}", "sub"),
        (f"?token={token('has space')}", "user id"),
        (f"?token={token('alice', key='a-different-secret-that-is-long-enough')}", "not accepted"),
    ],
)
async def test_auth_failures_close_4401_before_anything_else(single, query, reason):
    """Missing, invalid or expired tokens and bad subs: closed with 4401 and a reason, no frame first."""
    code, text, frames = await closed_with(single.ws_url + query)
    assert code == 4401
    assert reason in text
    assert frames == []


async def test_bearer_header_authenticates(single, http):
    """Non-browser clients may send the token in an Authorization header."""
    user = uid()
    async with websockets.connect(single.ws_url, additional_headers={"Authorization": f"Bearer {token(user)}"}) as ws:
        client = Client(ws)
        assert (await client.welcome())["user"] == user
        await publish(http, single, user, "hdr")
        assert (await client.notifications(1))[0]["event"] == "hdr"


async def test_ping_pong_and_bad_frames_keep_the_socket_open(single, http):
    """ping gets pong; non-JSON, unknown types and binary frames get error frames; the socket stays usable."""
    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    await client.send({"type": "ping"})
    assert await client.recv() == {"type": "pong"}
    for bad, code in [
        ("not json", "invalid_json"),
        ('{"type":"dance"}', "unknown_type"),
        ("[1,2]", "invalid_frame"),
        ('{"type":"ack","id":"nope"}', "invalid_id"),
        ('{"type":"refresh"}', "invalid_token"),
    ]:
        await client.send(bad)
        frame = await client.recv()
        assert frame["type"] == "error" and frame["code"] == code and frame["message"]
    await client.ws.send(b"\x00\x01")
    assert (await client.recv())["code"] == "binary_not_supported"
    await publish(http, single, user, "still-open")
    assert (await client.notifications(1))[0]["event"] == "still-open"
    await client.close()


async def test_other_users_get_nothing(single, http):
    """A notification for one user never reaches another user's socket."""
    alice, bob = uid("alice"), uid("bob")
    a, b = await Client.connect(single, alice), await Client.connect(single, bob)
    await a.welcome()
    await b.welcome()
    await publish(http, single, alice, "private")
    assert (await a.notifications(1))[0]["event"] == "private"
    await b.nothing()
    await a.close()
    await b.close()


@pytest.mark.parametrize("glob", ["a*", "user?1", "[x]", "*", "u\\*"])
async def test_glob_characters_are_ordinary(single, http, glob):
    """`a*`, `user?1` and `[x]` are ids that reach exactly that user, not a pattern."""
    suffix = uuid.uuid4().hex[:6]
    target, lookalike = f"{glob}{suffix}", f"{glob.replace('*', 'z').replace('?', 'q')}{suffix}x"
    t, other = await Client.connect(single, target), await Client.connect(single, lookalike)
    await t.welcome()
    await other.welcome()
    from urllib.parse import quote

    response = await http.post(
        f"{single.url}/notify/{quote(target, safe='')}",
        json={"event": "g"},
        headers={"Authorization": f"Bearer {token('svc', 'notify:publish')}"},
    )
    assert response.status_code == 202
    assert (await t.notifications(1))[0]["event"] == "g"
    await other.nothing()
    await t.close()
    await other.close()


async def test_many_devices_each_get_it_once(single, http):
    """Every open socket of a user receives each notification exactly once."""
    user = uid()
    devices = [await Client.connect(single, user) for _ in range(3)]
    for d in devices:
        await d.welcome()
    response = await publish(http, single, user, "multi")
    assert response.json()["online"] == 3
    for d in devices:
        [frame] = await d.notifications(1)
        assert frame["id"] == response.json()["id"]
        await d.nothing(0.2)
        await d.close()


async def test_order_from_one_publisher_is_kept(single, http):
    """Notifications from one publisher to one user arrive in the order they were accepted."""
    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    for n in range(100):
        assert (await publish(http, single, user, "seq", n)).status_code == 202
    frames = await client.notifications(100)
    assert [f["data"] for f in frames] == list(range(100))
    await client.close()


async def test_broadcast_reaches_every_socket(single, http):
    """A broadcast reaches every open socket and is marked as such."""
    clients = [await Client.connect(single, uid("bc")) for _ in range(3)]
    for c in clients:
        await c.welcome()
    response = await publish(http, single, None, "all", {"v": 1})
    assert response.status_code == 202 and response.json()["online"] is None
    for c in clients:
        [frame] = await c.notifications(1)
        assert frame["broadcast"] is True and frame["id"] == response.json()["id"]
        await c.close()


async def test_origin_not_allowed_is_refused_with_403():
    """With NOTIFY_ALLOWED_ORIGINS set, a browser from another origin cannot open a socket."""
    replica = Replica({"NOTIFY_ALLOWED_ORIGINS": "https://app.example, https://admin.example"}).start()
    try:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{replica.ws_url}?token={token()}", origin="https://evil.example")
        assert refused.value.response.status_code == 403
        async with websockets.connect(f"{replica.ws_url}?token={token()}", origin="https://admin.example") as ws:
            assert (await Client(ws).welcome())["user"] == "alice"
    finally:
        replica.stop()


def test_wire_frames_are_valid_websocket_text_frames():
    """Frames encoded once for all sockets parse as unmasked text frames of every length class."""
    from websockets.frames import Frame, Opcode
    from websockets.streams import StreamReader

    from service.core.frames import wire_text

    for size in (0, 125, 126, 65535, 65536, 70000):
        text = "é" * (size // 2) + "x" * (size % 2)
        reader = StreamReader()
        reader.feed_data(wire_text(text))
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            next(parser)
        except StopIteration as done:
            frame = done.value
        assert frame.opcode is Opcode.TEXT and frame.fin and frame.data.decode() == text
