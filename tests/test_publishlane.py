"""The publish lane's subset of HTTP/1.1, held to httptools: wherever `split` accepts a request,
httptools reads the same method, target, headers and body from it, as one whole keep-alive request;
and on a real replica, the lane answers a keep-alive publisher's requests after its first, while
whatever it does not take is read by httptools as before."""

from __future__ import annotations

import asyncio
import random

import httptools
import orjson
import pytest

from service.server.publishlane import split

from .mutations import compare
from .test_httpprotocol import post, responses, uid
from .utils import Client

MAX_BODY = 4096


class _Read:
    """What httptools makes of a byte string."""

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.begun = self.complete = 0

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete += 1


def _agrees_with_httptools(data: bytes) -> None:
    accepted = split(data, MAX_BODY)
    assert accepted is not None
    path, headers, body = accepted
    read = _Read()
    parser = httptools.HttpRequestParser(read)
    parser.feed_data(data)  # raises if httptools finds it malformed
    assert (read.begun, read.complete) == (1, 1), data
    assert parser.get_method() == b"POST" and parser.get_http_version() == "1.1", data
    assert parser.should_keep_alive() and not parser.should_upgrade(), data
    url = httptools.parse_url(read.url)
    assert url.query is None and url.path.decode("ascii") == path, data
    assert read.headers == headers, data
    assert read.body == body, data


BODY = b'{"event":"order.shipped","data":{"order":7}}'
BASE = post("/notify/alice", BODY, bearer="t0k.en-_")

# Bytes a mutation may insert: the ones that matter to a parser.
PALETTE = b' \t\r\n:;/?%#@"\\,=\x00\x01\x7f\x80\xffAz09-_.'


def test_what_the_lane_accepts_httptools_reads_the_same():
    """Twenty thousand mutations of a publish request: every one the lane accepts, httptools reads
    alike; and both kinds are plentiful, so the comparison is not vacuous."""
    variants = [
        BASE,
        post("/broadcast", b"{}", extra="Idempotency-Key: k-1\r\nConnection: keep-alive\r\n"),
        post("/topics/chat:lobby", b'{"event":"e"}', extra="X-Request-ID: r1\r\nOrigin: http://a.example\r\n"),
    ]
    accepted, refused = compare(
        random.Random(20261207),
        variants,
        PALETTE,
        lambda data: split(data, MAX_BODY),
        _agrees_with_httptools,
        lines=True,
    )
    assert accepted > 1_000 and refused > 5_000, (accepted, refused)


@pytest.mark.parametrize(
    "data",
    [
        post("/notify/a", b"{}", version="1.0"),
        post("/notify/a", b"{}", extra="Connection: close\r\n"),
        post("/notify/a", b"{}", extra="Expect: 100-continue\r\n"),
        post("/notify/a", b"{}", extra="Upgrade: websocket\r\n"),
        post("/notify/a", b"{}", extra="Transfer-Encoding: chunked\r\n"),
        post("/notify/a", b"{}", extra="Content-Length: 2\r\n"),  # a second one
        post("/notify/a?x=1", b"{}"),
        post("/notify/%61", b"{}"),
        post("/notify/a", b"{}", extra="X-A: b \r\n"),  # whitespace at a value's end
        post("/notify/a", b"{}", extra="X-A: b\r\n c\r\n"),  # a folded line
        post("/notify/a", b"{}", extra="X-A: b\tc\r\n"),
        post("/notify/a", b"{}", extra="X_A: b\r\n"),
        post("/notify/a", b"{}") + post("/notify/a", b"{}"),  # a request behind it
        post("/notify/a", b'{"event":"e"}')[:-3],  # the body not all in
        post("/notify/a", b"{}").replace(b"\r\nHost", b"\nHost"),
        post("/notify/a", b"{}").replace(b"POST", b"PUT"),
        post("/notify/a", b"x" * (MAX_BODY + 1)),
        b"GET /notify/a HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_the_lane_leaves_the_rest_to_httptools(data):
    assert split(data, MAX_BODY) is None


def test_an_ordinary_publish_is_split():
    path, headers, body = split(BASE, MAX_BODY)
    assert path == "/notify/alice" and body == BODY
    assert dict(headers)[b"authorization"] == b"Bearer t0k.en-_"
    _agrees_with_httptools(BASE)


async def test_a_keep_alive_publisher_takes_the_lane_after_its_first_publish(single, http):
    """Publishes after the first on a keep-alive connection are read by the lane (its counter says
    so) and delivered in order; a request split over two writes, two requests in one write, and a
    refused one are read by httptools and answered as before."""
    from .rawhttp import metric

    user = uid()
    client = await Client.connect(single, user)
    await client.welcome()
    reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
    before = await metric(http, single, "notify_publish_lane_total")
    for n in range(5):
        writer.write(post(f"/notify/{user}", orjson.dumps({"event": "e", "data": n})))
        [(status, _, _)] = await responses(reader, 1)
        assert status == 202
    assert await metric(http, single, "notify_publish_lane_total") - before == 4

    whole = post(f"/notify/{user}", b'{"event":"split","data":5}')
    writer.write(whole[:20])
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(whole[20:])
    pair = post(f"/notify/{user}", b'{"event":"a","data":6}') + post(f"/notify/{user}", b'{"event":"b","data":7}')
    writer.write(pair)
    writer.write(post(f"/notify/{user}", b'{"data":8}'))  # no event: 422 from the route
    answers = await responses(reader, 4)
    assert [status for status, _, _ in answers] == [202, 202, 202, 422]
    assert orjson.loads(answers[3][2])["error"] == "invalid_request"
    writer.write(post(f"/notify/{user}", b'{"event":"last","data":9}'))
    [(status, _, _)] = await responses(reader, 1)
    assert status == 202
    got = await client.notifications(9)
    assert [f["data"] for f in got] == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    # Only the last was the lane's: the rest were split, paired, or refused.
    assert await metric(http, single, "notify_publish_lane_total") - before == 5
    writer.close()
    await client.close()


async def test_on_redis_a_lane_publish_is_answered_from_redis_reply(own_redis, http):
    """On Redis, a lane publish is sent with no task and answered from the publish script's reply
    (`fastpath.answer_soon`): the same answer as the route's (id, sockets online, duplicate on a
    retried Idempotency-Key, the caller's X-Request-ID), delivered once each, counted once; after
    Redis lost its scripts it is still published (EVAL); with Redis hung it gets 503 within the
    deadline, and once Redis is back its retry is published, once."""
    from .rawhttp import metric
    from .utils import Replica, cluster_env

    replica = Replica(cluster_env(own_redis, NOTIFY_PUBLISH_TIMEOUT_SECONDS="0.5")).start()
    user = uid()
    client = await Client.connect(replica, user)
    await client.welcome()
    reader, writer = await asyncio.open_connection("127.0.0.1", replica.port)

    async def publish(data: object, extra: str = "") -> tuple[int, dict[str, str], dict[str, object]]:
        writer.write(post(f"/notify/{user}", orjson.dumps({"event": "e", "data": data}), extra=extra))
        [(status, headers, body)] = await responses(reader, 1)
        return status, headers, orjson.loads(body)

    try:
        lane, fast = (
            await metric(http, replica, "notify_publish_lane_total"),
            await metric(http, replica, "notify_publish_fast_path_total"),
        )
        answers = [await publish(n) for n in range(4)]
        assert [status for status, _, _ in answers] == [202] * 4
        assert all(body["online"] == 1 and body["duplicate"] is False for _, _, body in answers)
        status, headers, first = await publish(4, extra="Idempotency-Key: k1\r\nX-Request-ID: req-lane-1\r\n")
        assert status == 202 and headers["x-request-id"] == "req-lane-1" and first["duplicate"] is False
        status, _, again = await publish(4, extra="Idempotency-Key: k1\r\n")
        assert status == 202 and again["duplicate"] is True and again["id"] == first["id"]
        assert await metric(http, replica, "notify_publish_lane_total") - lane == 5
        assert await metric(http, replica, "notify_publish_fast_path_total") - fast == 6

        assert own_redis.command("SCRIPT", "FLUSH") in ("OK", "True")
        status, _, body = await publish(5)
        assert status == 202 and body["online"] == 1

        own_redis.pause()
        try:
            status, _, body = await publish(6, extra="Idempotency-Key: k2\r\n")
        finally:
            own_redis.resume()
        assert status == 503 and body["error"] == "broker_unavailable"
        # Sent before Redis hung, it may have been published: the retry with its key makes sure, once.
        status, _, _ = await publish(6, extra="Idempotency-Key: k2\r\n")
        assert status == 202
        status, _, _ = await publish(7)
        assert status == 202
        got = await client.notifications(8)
        assert [frame["data"] for frame in got] == [0, 1, 2, 3, 4, 5, 6, 7]
        assert (await http.get(replica.url + "/readyz")).status_code == 200
    finally:
        writer.close()
        await client.close()
        replica.stop()
