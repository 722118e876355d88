"""A lean HTTP/1.1 client for what the service sends to other systems: webhooks, hooks and pushes.

These requests need little of a general client: a POST to a URL the operator (or a push service)
gave, keep-alive connections to a handful of origins, no redirects, no proxies, no cookies, and at
most a bounded part of any answer. httpx spent most of a webhook attempt's CPU in the layers it
has for everything else (request and header models, pool bookkeeping, a poll per pooled
connection), more than the signing and the queue together; this client writes the request as one
buffer and reads the answer with httptools, the parser uvicorn already uses for requests.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

USER_AGENT = "notify-service"
# Answers larger than a caller's bound are cut there; a header block beyond this is refused.
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
# Origins whose idle connections are kept; more (push services are few) and the least used go.
MAX_ORIGINS = 256


class HTTPError(Exception):
    """No answer: the connection was refused, reset or closed early, or the answer was not HTTP."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header's values joined by ", "
    body: bytes  # at most the caller's bound

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class Client:
    """Keep-alive connections per origin, at most `connections` at once to each; requests beyond
    wait for one. A request's deadline is the caller's (`asyncio.timeout` around `post`): a request
    cancelled midway closes its connection, so nothing of its answer is read by the next."""

    def __init__(self, connections: int, user_agent: str = USER_AGENT) -> None:
        self._connections = connections
        self._user_agent = user_agent
        self._origins: collections.OrderedDict[tuple[str, str, int], _Origin] = collections.OrderedDict()
        self._tls: ssl.SSLContext | None = None  # made once, when the first https origin is met
        self._closed = False

    async def post(self, url: str, headers: dict[str, str], body: bytes, max_answer: int) -> Answer:
        """POST `body` to `url` with `headers` (content-length, host and user-agent are added); the
        answer's body is read up to `max_answer` bytes, and a connection with more is not reused."""
        if self._closed:
            raise HTTPError("the client is closed")
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
        if scheme not in ("http", "https") or not host:
            raise HTTPError(f"not an http or https URL: {url[:100]!r}")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise HTTPError(f"bad port in {url[:100]!r}") from exc
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rpartition("@")[2]  # credentials in a URL are never sent as a Host
        head = [f"POST {target} HTTP/1.1\r\nhost: {netloc}\r\nuser-agent: {self._user_agent}\r\n"]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise HTTPError(f"header {name!r} holds a line break")
            head.append(f"{name}: {value}\r\n")
        head.append(f"content-length: {len(body)}\r\n\r\n")
        request = "".join(head).encode("latin-1") + body
        return await self._origin(scheme, host, port).send(request, max_answer)

    def _origin(self, scheme: str, host: str, port: int) -> _Origin:
        key = (scheme, host, port)
        origin = self._origins.get(key)
        if origin is None:
            tls = None
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
            origin = self._origins[key] = _Origin(host, port, tls, self._connections)
            if len(self._origins) > MAX_ORIGINS:
                _, oldest = self._origins.popitem(last=False)
                oldest.close()  # its requests in flight finish on their own connections
        else:
            self._origins.move_to_end(key)
        return origin

    async def aclose(self) -> None:
        self._closed = True
        for origin in self._origins.values():
            origin.close()
        self._origins.clear()


class _Origin:
    """One scheme, host and port: its idle connections (the most recent first) and its bound."""

    __slots__ = ("closed", "host", "idle", "port", "slots", "tls")

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, connections: int) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(connections)
        self.closed = False  # no connection is kept any more (the client closed, or the origin was evicted)

    async def send(self, request: bytes, max_answer: int) -> Answer:
        async with self.slots:
            while self.idle:
                connection = self.idle.pop()
                if not connection.usable():
                    continue
                try:
                    return await self._exchange(connection, request, max_answer)
                except _StaleConnection:
                    # The origin closed it while it sat idle, before reading a byte of this request:
                    # the request goes again on a fresh connection (what browsers do, safe for a POST).
                    continue
            connection = await self._connect()
            try:
                return await self._exchange(connection, request, max_answer)
            except _StaleConnection as exc:
                raise HTTPError("the connection closed before an answer") from exc

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await loop.create_connection(
                _Connection, self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise HTTPError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return connection

    async def _exchange(self, connection: _Connection, request: bytes, max_answer: int) -> Answer:
        done = False
        try:
            answer = await connection.exchange(request, max_answer)
            done = True
        finally:
            if not done:
                connection.close()  # cancelled or failed midway: its answer must not meet the next request
        if connection.reusable and not self.closed:
            self.idle.append(connection)
        else:
            connection.close()
        return answer

    def close(self) -> None:
        self.closed = True
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class _StaleConnection(HTTPError):
    """A reused connection closed before any of its answer came."""


class _Connection(asyncio.Protocol):
    """One connection, one request at a time: httptools calls the `on_*` methods as the answer comes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._closed = False
        self._used = False  # a request went out on it before this one
        self._received = 0  # bytes of the current answer so far
        self._reset(0)

    def _reset(self, max_answer: int) -> None:
        self._max_answer = max_answer
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._name = b""
        self._body: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._cut = False

    # ---- the caller's side

    def usable(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()

    async def exchange(self, request: bytes, max_answer: int) -> Answer:
        assert self.transport is not None and self._waiter is None
        self._reset(max_answer)
        self._received = 0
        self.reusable = False
        reused, self._used = self._used, True
        self._waiter = asyncio.get_running_loop().create_future()
        if self._closed:
            self._waiter = None
            raise (_StaleConnection if reused else HTTPError)("the connection closed before an answer")
        self.transport.write(request)
        try:
            return await self._waiter
        except _StaleConnection:
            if reused:
                raise
            raise HTTPError("the connection closed before an answer") from None
        finally:
            self._waiter = None

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()

    # ---- asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # nothing was asked: an origin that talks out of turn is not reused
            return
        self._received += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPError(f"not an HTTP answer: {exc.__context__ or exc}"))
        if self._cut:
            self.close()  # the answer is complete as far as it is read; the rest is never read

    def eof_received(self) -> bool:
        return False  # closes the transport; connection_lost settles what was waiting

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._headers_done and self._parser.get_status_code() and not self._has_length():
            self._finish()  # an answer without a length ends where the connection does
        elif self._received == 0:
            self._fail(_StaleConnection("the connection closed before an answer"))
        else:
            self._fail(HTTPError("the connection closed in the middle of the answer"))

    # ---- httptools' side

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADERS:
            raise ValueError("the answer's header block is too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        room = self._max_answer - self._size
        if room > 0:
            piece = body[:room]
            self._body.append(piece)
            self._size += len(piece)
        if len(body) > room and not self._cut:
            self._cut = True
            self._finish()

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an interim answer: the real one follows
            self._reset(self._max_answer)
            return
        self._finish()

    # ----

    def _has_length(self) -> bool:
        return "content-length" in self._headers or "chunked" in self._headers.get("transfer-encoding", "")

    def _finish(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        status = self._parser.get_status_code()
        self.reusable = not self._cut and not self._closed and self._parser.should_keep_alive()
        waiter.set_result(Answer(status, self._headers, b"".join(self._body)))

    def _fail(self, error: HTTPError) -> None:
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)
        self.close()
