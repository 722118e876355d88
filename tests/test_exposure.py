"""Direct exposure: request heads too large, against real replicas on raw sockets.

Each test does what a careless or hostile client would do and checks what every client sees: the
answer (status, JSON error), when the connection closes, and that well-behaved clients beside it
are not disturbed.
"""

from __future__ import annotations

from .rawhttp import exchange, head, report
from .utils import Client, token

WS_HEADERS = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")


async def test_oversized_handshakes_are_refused_at_once(single):
    """A WebSocket handshake with a 10 KB header line, or with 200 headers, is answered 431 with a
    JSON error within a second (it used to hang). A normal handshake still works afterwards."""
    ws = head("GET", f"/ws?token={token('big')}", *WS_HEADERS, "Sec-WebSocket-Version: 13")
    cases = {
        "websocket, 10 KB header line": ws + b"X-Big: " + b"a" * 10_000 + b"\r\n\r\n",
        "websocket, 200 headers": ws + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
    }
    answered_after = []
    for name, data in cases.items():
        answer = await exchange(single.port, data)
        assert answer.status == 431, (name, answer.raw[:200])
        assert answer.json()["error"] == "headers_too_large", name
        assert answer.closed_after is not None and answer.closed_after < 1.0, (name, answer.closed_after)
        answered_after.append(answer.closed_after)
    report("oversized_heads", cases=len(cases), slowest_answer_s=max(answered_after))
    client = await Client.connect(single, "big")
    await client.welcome()
    await client.close()
