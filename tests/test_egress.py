"""The HTTP client that webhooks, hooks and pushes go out on (service/egress/http.py), against real
servers on real sockets that answer as the test says: keep-alive reuse, the answer's framings
(length, chunked, to the close, interim 100), a bound on what is read, connections an origin closed
while idle, deadlines, refusals, redirects never followed, and TLS verified against the system's
trust store."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable

import pytest

from service.egress import Client, HTTPError

from .topology import TestCA

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
# What an origin does with a request: answer these bytes, after a delay (seconds, bytes), or say nothing.
Reply = bytes | tuple[float, bytes] | None


class Origin:
    """A server answering each request as `answer(head, body)` says, noting every request's head
    and body, and how many connections were opened to it."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.answer: Callable[[bytes, bytes], Reply] = lambda head, body: OK
        self.close_after_answer = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def start(self, tls: ssl.SSLContext | None = None) -> Origin:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = self.answer(head, body)
                if isinstance(answer, tuple):
                    await asyncio.sleep(answer[0])
                    answer = answer[1]
                if answer is not None:
                    writer.write(answer)
                    await writer.drain()
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def drop_connections(self) -> None:
        for writer in self.writers:
            writer.close()

    async def stop(self) -> None:
        self.drop_connections()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = await Origin().start()
    yield server
    await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client(4, user_agent="notify-test")
    yield c
    await c.aclose()


async def test_requests_reuse_one_keep_alive_connection_and_carry_what_was_given(origin, client):
    for n in range(3):
        answer = await client.post(f"{origin.url}/hook?n={n}", {"webhook-id": f"msg_{n}"}, b'{"n":%d}' % n, 1024)
        assert (answer.status, answer.body) == (200, b"ok")
    assert origin.connections == 1
    head, body = origin.requests[2]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /hook?n=2 HTTP/1.1"
    assert f"host: {origin.url.removeprefix('http://')}" in lines
    assert "user-agent: notify-test" in lines and "webhook-id: msg_2" in lines and "content-length: 7" in lines
    assert body == b'{"n":2}'


async def test_answers_are_read_whatever_their_framing(origin, client):
    origin.answer = lambda head, body: (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nX-Thing: a\r\nx-thing: b\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    answer = await client.post(origin.url, {}, b"", 1024)
    assert answer.body == b"abcde" and answer.header("x-thing") == "a, b"
    origin.answer = lambda head, body: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    assert (await client.post(origin.url, {}, b"", 1024)).status == 204
    assert origin.connections == 1  # both kept the connection
    # No length: the answer ends where the connection does.
    origin.answer = lambda head, body: b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\n\r\nbusy, come back"
    origin.close_after_answer = True
    answer = await client.post(origin.url, {}, b"", 1024)
    assert (answer.status, answer.header("retry-after"), answer.body) == (503, "7", b"busy, come back")


async def test_at_most_the_bound_of_an_answer_is_read_and_its_connection_goes(origin, client):
    origin.answer = lambda head, body: b"HTTP/1.1 500 Oops\r\ncontent-length: 1000000\r\n\r\n" + b"x" * 1_000_000
    answer = await client.post(origin.url, {}, b"", 64 * 1024)
    assert answer.status == 500 and answer.body == b"x" * 64 * 1024
    origin.answer = lambda head, body: b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    assert (await client.post(origin.url, {}, b"", 1024)).status == 200
    assert origin.connections == 2  # the cut answer's rest was never read: not reused


async def test_a_redirect_is_an_answer_never_followed(origin, client):
    origin.answer = lambda head, body: (
        b"HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:1/x\r\ncontent-length: 0\r\n\r\n"
    )
    answer = await client.post(origin.url, {}, b"{}", 1024)
    assert answer.status == 307 and len(origin.requests) == 1


async def test_a_connection_the_origin_closed_while_idle_is_replaced(origin, client):
    assert (await client.post(origin.url, {}, b"1", 1024)).status == 200
    origin.drop_connections()  # seen by the client before its next request
    await asyncio.sleep(0.05)
    assert (await client.post(origin.url, {}, b"2", 1024)).status == 200
    # Closed as the next request arrives, before a byte of an answer (an origin's idle timeout
    # racing the request): the request goes again, once, on a fresh connection.
    threes = iter([None, OK])
    origin.answer = lambda head, body: next(threes) if body == b"3" else OK
    origin.close_after_answer = True
    assert (await client.post(origin.url, {}, b"3", 1024)).status == 200
    assert [body for _, body in origin.requests] == [b"1", b"2", b"3", b"3"]
    assert origin.connections == 3


async def test_no_answer_in_time_is_abandoned_and_its_late_answer_reaches_nobody(origin, client):
    late = b"HTTP/1.1 500 Late\r\ncontent-length: 4\r\n\r\nlate"
    origin.answer = lambda head, body: (0.3, late) if body == b"first" else OK
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await client.post(origin.url, {}, b"first", 1024)
    answer = await client.post(origin.url, {}, b"second", 1024)
    await asyncio.sleep(0.3)
    assert (answer.status, answer.body) == (200, b"ok")  # the second request's own answer
    assert origin.connections == 2  # the abandoned connection was closed, not reused


async def test_a_connection_cut_midway_or_refused_is_an_http_error(origin, client):
    origin.answer = lambda head, body: b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"
    origin.close_after_answer = True
    with pytest.raises(HTTPError, match="middle of the answer"):
        await client.post(origin.url, {}, b"", 1024)
    origin.answer = lambda head, body: b"SMTP ready\r\n\r\n"
    with pytest.raises(HTTPError, match="not an HTTP answer"):
        await client.post(origin.url, {}, b"", 1024)
    port = origin.server.sockets[0].getsockname()[1]
    await origin.stop()
    with pytest.raises(HTTPError, match="cannot connect"):
        await client.post(f"http://127.0.0.1:{port}/", {}, b"", 1024)
    with pytest.raises(HTTPError, match="line break"):
        await client.post(origin.url, {"x": "a\r\nevil: 1"}, b"", 1024)
    with pytest.raises(HTTPError, match="not an http"):
        await client.post("ftp://127.0.0.1/", {}, b"", 1024)


async def test_no_more_connections_than_the_bound_to_one_origin(origin):
    client = Client(2)
    origin.answer = lambda head, body: None
    posts = [asyncio.create_task(client.post(origin.url, {}, b"", 1024)) for _ in range(5)]
    await asyncio.sleep(0.2)
    assert origin.connections == 2 and len(origin.requests) == 2
    for post in posts:
        post.cancel()
    await asyncio.gather(*posts, return_exceptions=True)
    await client.aclose()


async def test_https_is_verified_against_the_systems_trust_store(monkeypatch):
    ca = TestCA()
    try:
        cert, key = ca.issue("origin")
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        server = await Origin().start(tls)
        try:
            untrusting = Client(1)
            with pytest.raises(HTTPError, match="cannot connect"):
                await untrusting.post(server.url, {}, b"", 1024)
            await untrusting.aclose()
            # OpenSSL's default trust store is where SSL_CERT_FILE says: the operator's own CA.
            monkeypatch.setenv("SSL_CERT_FILE", ca.cert_file)
            trusting = Client(1)
            answer = await trusting.post(server.url + "/hook", {}, b"{}", 1024)
            await trusting.post(server.url + "/hook", {}, b"{}", 1024)
            await trusting.aclose()
            assert (answer.status, answer.body, server.connections) == (200, b"ok", 1)
        finally:
            await server.stop()
    finally:
        ca.remove()
