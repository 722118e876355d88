"""Publishes answered by the server's HTTP protocol itself, on raw connections: order, keep-alive,
pipelining and clients that leave, against a real replica."""

from __future__ import annotations

import asyncio
import uuid

import orjson

from .utils import TIMEOUT, Client, publisher_headers, token


def uid() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


def post(path: str, body: bytes, version: str = "1.1", extra: str = "", bearer: str | None = None) -> bytes:
    auth = {"Authorization": f"Bearer {bearer}"} if bearer is not None else publisher_headers()
    headers = "".join(f"{k}: {v}\r\n" for k, v in auth.items())
    return (
        f"POST {path} HTTP/{version}\r\nHost: x\r\n{headers}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


async def responses(reader: asyncio.StreamReader, count: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read `count` whole HTTP responses (each with a Content-Length)."""
    out = []
    async with asyncio.timeout(TIMEOUT):
        for _ in range(count):
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in head[1:] if line)}
            body = await reader.readexactly(int(headers["content-length"]))
            out.append((int(head[0].split()[1]), headers, body))
    return out


async def test_pipelined_requests_are_answered_in_order(single):
    """Publishes, a refused publish and a GET sent in one write come back in order, each answered
    as on its own, and only the accepted publishes are delivered."""
    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
    writer.write(
        post(f"/notify/{user}", b'{"event":"first"}')
        + post(f"/notify/{user}", b'{"data":1}')
        + post(f"/notify/{user}", b'{"event":"second"}')
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers = await responses(reader, 4)
    assert [status for status, _, _ in answers] == [202, 422, 202, 200]
    assert orjson.loads(answers[1][2])["error"] == "invalid_request"
    sent = [orjson.loads(body)["id"] for status, _, body in answers if status == 202]
    got = await client.notifications(2)
    assert [f["event"] for f in got] == ["first", "second"] and [f["id"] for f in got] == sent
    await client.nothing(0.3)
    writer.close()
    await client.close()


async def test_keep_alive_carries_many_publishes(single):
    """One keep-alive connection publishes one after another; each answer is a complete 202."""
    user = uid()
    reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
    ids = []
    for n in range(20):
        writer.write(post(f"/notify/{user}", orjson.dumps({"event": "e", "data": n})))
        [(status, headers, body)] = await responses(reader, 1)
        assert status == 202 and headers["content-type"] == "application/json" and "date" in headers
        ids.append(orjson.loads(body)["id"])
    assert len(set(ids)) == 20
    writer.close()


async def test_each_publish_on_a_connection_is_judged_by_its_own_token(single):
    """A connection remembers its last publisher's token, but only that exact token: another one on
    the same keep-alive connection is verified on its own (refused without the scope, or forged,
    or expired), and the first still publishes after them."""
    user = uid()
    good = token("backend", "notify:publish")
    forged = good[:-2] + ("AA" if not good.endswith("AA") else "BB")
    steps = [
        (good, 202),
        (token("backend", "notify:read"), 403),
        (forged, 401),
        (token("backend", "notify:publish", ttl=-5), 401),
        (good, 202),
    ]
    reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
    for bearer, expected in steps:
        writer.write(post(f"/notify/{user}", b'{"event":"e"}', bearer=bearer))
        [(status, _, body)] = await responses(reader, 1)
        assert status == expected, (expected, body)
    writer.close()


async def test_http10_and_connection_close_are_honoured(single):
    """HTTP/1.0 and `Connection: close` publishes get their 202, then the server closes the connection."""
    for version, extra in (("1.0", ""), ("1.1", "Connection: close\r\n")):
        reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
        writer.write(post("/broadcast", b'{"event":"e"}', version, extra))
        [(status, headers, _)] = await responses(reader, 1)
        assert status == 202 and headers["connection"] == "close"
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""
        writer.close()


async def test_publisher_that_leaves_at_once_still_publishes(single, http):
    """A publisher that closes its connection right after sending still has its notification
    delivered, and the replica goes on serving."""
    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    for n in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", single.port)
        writer.write(post(f"/notify/{user}", orjson.dumps({"event": "gone", "data": n})))
        writer.transport.abort()
    got = await client.notifications(5)
    assert sorted(f["data"] for f in got) == list(range(5))
    assert (await http.get(single.url + "/healthz")).status_code == 200
    await client.close()


async def test_body_in_pieces_and_oversized_body(single):
    """A body that arrives in several writes is published; one over the limit is refused with 413."""
    user = uid()
    reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
    raw = post(f"/notify/{user}", b'{"event":"split","data":"' + b"x" * 5000 + b'"}')
    for i in range(0, len(raw), 700):
        writer.write(raw[i : i + 700])
        await writer.drain()
        await asyncio.sleep(0.01)
    [(status, _, _)] = await responses(reader, 1)
    assert status == 202
    big = b'{"event":"big","data":"' + b"x" * 70_000 + b'"}'
    writer.write(post(f"/notify/{user}", big))
    [(status, _, body)] = await responses(reader, 1)
    assert status == 413 and orjson.loads(body)["error"] == "payload_too_large"
    writer.close()


async def test_topic_publishes_pipelined_with_refusals(redis_server):
    """`POST /topics/{topic}` is answered in place too: pipelined with an unconfigured namespace (404)
    and a malformed name (422), each comes back in order, and members get only the accepted ones."""
    import json

    from .test_topics import connect, join
    from .utils import cluster_env, running

    with running(cluster_env(redis_server, NOTIFY_TOPICS=json.dumps({"feed": {"join": "any"}}))) as replica:
        topic = f"feed:{uid()}"
        member = await connect(replica, uid())
        await join(member, topic)
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        writer.write(
            post(f"/topics/{topic}", b'{"event":"one"}')
            + post("/topics/nowhere:x", b'{"event":"lost"}')
            + post("/topics/feed:bad%20name", b'{"event":"lost"}')
            + post(f"/topics/{topic}", b'{"event":"two"}')
        )
        answers = await responses(reader, 4)
        assert [status for status, _, _ in answers] == [202, 404, 422, 202]
        accepted = [orjson.loads(body) for status, _, body in answers if status == 202]
        assert all(a["members"] == 1 and not a["duplicate"] for a in accepted)
        got = await member.notifications(2)
        assert [(f["event"], f["id"]) for f in got] == [("one", accepted[0]["id"]), ("two", accepted[1]["id"])]
        await member.nothing(0.3)
        writer.close()
        await member.close()


async def test_fast_path_and_route_answer_alike(http):
    """The same publish answered by the HTTP protocol itself and by the framework's route (a browser's
    Origin sends it there) gets the same 202 body, byte for byte, for a user, a broadcast and a topic:
    repeated with one Idempotency-Key, each path answers the first publish's id, ts and count. The
    fast path's counter tells which path answered."""
    import json

    from .rawhttp import metric
    from .test_topics import connect, join
    from .utils import running

    with running({"NOTIFY_TOPICS": json.dumps({"feed": {"join": "any"}})}) as replica:
        user, topic = uid(), f"feed:{uid()}"
        member = await connect(replica, user)
        await join(member, topic)
        reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)
        origin = "Origin: http://app.example\r\n"
        for path, counted in ((f"/notify/{user}", "online"), ("/broadcast", None), (f"/topics/{topic}", "members")):
            key = f"Idempotency-Key: {uid()}\r\n"
            before = await metric(http, replica, "notify_publish_fast_path_total")
            answers = []
            for extra in (key, key, key + origin):  # one at a time: a pipelined publish may go to the framework
                writer.write(post(path, b'{"event":"e"}', extra=extra))
                answers += await responses(reader, 1)
            (s1, _, first), (s2, _, fast), (s3, _, route) = answers
            assert (s1, s2, s3) == (202, 202, 202)
            assert fast == route, (path, fast, route)
            answer = orjson.loads(fast)
            assert answer["id"] == orjson.loads(first)["id"] and answer["duplicate"] is True
            if counted:
                assert answer[counted] == 1, (path, answer)
            after = await metric(http, replica, "notify_publish_fast_path_total")
            assert after - before == 2, (path, before, after)  # the first two, not the one with an Origin
        writer.close()
        await member.close()
