"""Bodies that cannot be parsed, however they fail, answer 422 invalid_request on every endpoint
that takes one, and their socket equivalent the invalid_json error frame; against a real replica."""

from __future__ import annotations

import orjson
import pytest

from .utils import ROOT, Client, publisher_headers, token

DEEP = b"[" * 5000 + b"]" * 5000
UNPARSEABLE = {
    "nested 5,000 deep": DEEP,
    "a 5,000-digit number": b"1" * 5000,
    "not UTF-8": b'"\xff\xfe"',
    "NaN": b"NaN",
    "a lone surrogate": b'"\\ud800"',
    "cut short": b'{"x":',
}

# Endpoints that exist only on a replica configured for them, tried with the same bodies there.
TRIED_ELSEWHERE = {
    "/me/devices/{device_id}": "tests/test_devices.py::test_unparseable_device_bodies_answer_422",
    "/webhooks/dead/replay": "tests/test_webhooks.py::test_unparseable_replay_bodies_answer_422",
}


@pytest.mark.parametrize("what", list(UNPARSEABLE))
async def test_unparseable_bodies_answer_422(single, http, what):
    """However a body fails to parse, every endpoint that takes one answers 422 invalid_request with
    a message saying so: the publish (the fast path's candidate), broadcast, topic publish, batch and
    read marker, which are all the endpoints the OpenAPI document gives a body."""
    value = UNPARSEABLE[what]
    publisher = {**publisher_headers(), "Content-Type": "application/json"}
    client = {"Authorization": f"Bearer {token('reader')}", "Content-Type": "application/json"}
    requests = {
        "/notify/{user_id}": ("/notify/someone", b'{"event":"e","data":' + value + b"}", publisher),
        "/broadcast": ("/broadcast", b'{"event":"e","data":' + value + b"}", publisher),
        "/topics/{topic}": ("/topics/room", b'{"event":"e","data":' + value + b"}", publisher),
        "/notify": ("/notify", b'[{"user":"someone","event":"e","data":' + value + b"}]", publisher),
        "/me/notifications/read": ("/me/notifications/read", b'{"up_to":' + value + b"}", client),
    }
    spec = orjson.loads((ROOT / "openapi" / "openapi.json").read_bytes())
    with_body = {path for path, ops in spec["paths"].items() for op in ops.values() if "requestBody" in op}
    assert with_body == set(requests) | set(TRIED_ELSEWHERE), "every endpoint that takes a body is tried"
    for path, body, headers in requests.values():
        response = await http.post(single.url + path, content=body, headers=headers)
        assert response.status_code == 422, (path, response.text)
        error = response.json()
        assert error["error"] == "invalid_request", (path, error)
        assert error["message"].startswith("the body is not valid JSON: "), (path, error)
    ok = await http.post(single.url + "/notify/someone", content=b'{"event":"e","data":"NaN"}', headers=publisher)
    assert ok.status_code == 202, "NaN inside a string is only text"


async def test_unparseable_frames_get_invalid_json(single):
    """The socket's equivalent: frames nested too deep, with a number too large, NaN or a lone
    surrogate each get an invalid_json error frame, and the socket stays open."""
    client = await Client.connect(single, "framer")
    await client.welcome()
    for frame in ['{"type":"ping","x":' + "[" * 2000 + "]" * 2000 + "}", '{"type":"ping","n":' + "9" * 4000 + "}"]:
        await client.send(frame)
        answer = await client.recv()
        assert answer["type"] == "error" and answer["code"] == "invalid_json", answer
    for frame in ['{"type":"ping","n":NaN}', '{"type":"ping","s":"\\ud800"}']:
        await client.send(frame)
        assert (await client.recv())["code"] == "invalid_json"
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    await client.close()
