"""The listener for user-side consumers: a socket that reconnects, resumes every stream from its own
cursor, joins its topics again and drops what it already saw (see service/client/__init__.py for the story;
the topics themselves are in service/client/topics.py; each stream's cursor, the dedupe and the
inbox refetched after a gap in service/client/streams.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .common import (
    Disconnected,
    ListenerError,
    TokenSource,
    TopicRefused,
    Unauthorized,
    _full_jitter,
    _resolve,
)
from .streams import Notification, StreamCursors
from .topics import TopicMembership

logger = logging.getLogger("service.client")


# Close codes: what the listener does after each (docs/protocol.md, "Close codes").
_CLOSE_FATAL = {1009: "an inbound frame was too big"}
_CLOSE_NORMAL = 1000
_CLOSE_UNAUTHORIZED = 4401
_CLOSE_DISCONNECTED = 4403
_CLOSE_TOO_MANY = 4029
_CLOSE_RESTART = 1012


class Listener:
    """Iterate over a user's notifications (and its topics' messages) across reconnects; see :func:`listen`.

    Options: ``topics`` (topic names to join on every socket; their messages are yielded too, with
    ``Notification.topic`` set), ``topic_tokens`` (topic -> topic token, or a callable giving one,
    for topics the connection token does not open), ``topic_since`` (topic -> id to resume that
    topic after on the first connection), ``backoff_base`` / ``backoff_max`` (seconds; the delay
    before reconnect n is uniform in ``[0, min(backoff_max, backoff_base * 2**n)]``, reset once a
    socket is welcomed; after 1012 a short random delay instead), ``max_attempts`` (failed connects
    in a row before :class:`ListenerError`; None: never give up), ``refetch_on_gap`` (after
    ``recovered: false`` or ``resync``, fetch ``GET /me/notifications`` and yield what is newer than
    the cursor), ``refresh_margin`` (with a token callable, send ``refresh`` this long before
    ``exp``, at most a third of the token's remaining life), ``open_timeout``, ``dedupe_window``
    (ids remembered), ``send_rate`` (frames per second this client sends at most, under the
    server's ``NOTIFY_MAX_INBOUND_RATE``), ``connect_options`` (passed to ``websockets.connect``,
    e.g. ``ssl`` or ``origin``). WebSocket pings are answered, and sent every 20 s, by the
    websockets library.

    A topic the server refuses to join raises :class:`TopicRefused` (``unavailable`` is retried);
    a topic this user is removed from (``left`` with ``reason: removed``) is dropped from
    ``topics`` and not joined again. A topic whose ``joined`` says ``recovered: false`` lost
    messages the server no longer retains (logged; ``topic_gaps`` counts them).

    Attributes a caller may read: ``state`` ("connecting", "open", "backoff", "closed"),
    ``last_id`` / ``last_broadcast_id`` / ``last_topic_ids`` (the resume cursors, one per stream),
    ``topics`` (the topics it joins), ``joined`` (those the current socket is in), ``topic_info``
    (the ``info`` a join hook gave each joined topic), ``connection_id``
    and ``url`` of the current socket, ``reconnects`` (how many times it connected again after the
    first)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        token: TokenSource,
        *,
        since: str | None = None,
        broadcast_since: str | None = None,
        topics: Iterable[str] = (),
        topic_tokens: Mapping[str, TokenSource] | None = None,
        topic_since: Mapping[str, str] | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_attempts: int | None = None,
        refetch_on_gap: bool = True,
        refresh_margin: float = 60.0,
        open_timeout: float = 10.0,
        dedupe_window: int = 2048,
        send_rate: float = 15.0,
        connect_options: Mapping[str, Any] | None = None,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("listen needs at least one URL")
        self._membership = TopicMembership(topics, topic_tokens, topic_since, send_rate)
        self.urls = [_ws_url(u) for u in url_list]
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None
        self._cursors = StreamCursors(since, broadcast_since, self._membership.last_ids, dedupe_window)
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_attempts = max_attempts
        self._refetch_on_gap = refetch_on_gap
        self._refresh_margin = refresh_margin
        self._open_timeout = open_timeout
        self._connect_options = dict(connect_options or {})
        self._url_index = 0
        self._stopped = False
        self._ws: Any = None
        self.state = "connecting"
        self.url: str | None = None
        self.connection_id: str | None = None
        self.reconnects = 0

    def __aiter__(self) -> AsyncIterator[Notification]:
        return self._run()

    @property
    def last_id(self) -> str | None:
        """The user's stream's resume cursor."""
        return self._cursors.last_id

    @property
    def last_broadcast_id(self) -> str | None:
        """The broadcast stream's resume cursor."""
        return self._cursors.last_broadcast_id

    @property
    def topics(self) -> list[str]:
        """The topics it joins on every socket (one the server removed this user from is dropped)."""
        return self._membership.topics

    @property
    def last_topic_ids(self) -> dict[str, str | None]:
        """The resume cursor of each of ``topics``."""
        return self._membership.last_ids

    @property
    def topic_gaps(self) -> int:
        """How many ``joined`` frames said ``recovered: false``."""
        return self._membership.gaps

    @property
    def topic_info(self) -> dict[str, Any]:
        """Topic -> the ``info`` of its latest ``joined``: what the namespace's join hook answered."""
        return self._membership.info

    @property
    def joined(self) -> frozenset[str]:
        """The topics the current socket is a member of (joined again on every new socket)."""
        return self._membership.joined

    async def close(self) -> None:
        """Stop: the iteration ends after the current socket closes."""
        self._stopped = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()

    # The main loop: connect, read until the socket closes, decide, back off, repeat.
    async def _run(self) -> AsyncIterator[Notification]:
        import websockets

        failures = 0
        first = True
        while not self._stopped:
            self.url = self.urls[self._url_index % len(self.urls)]
            self._url_index += 1
            if not first:
                self.reconnects += 1
            first = False
            self.state = "connecting"
            code: int | None = None
            reason = ""
            welcomed = False
            try:
                token = self._token if self._token is not None else await _resolve(self._token_source)
                self._token = token
                async with websockets.connect(
                    self._connect_url(self.url),
                    additional_headers={"Authorization": f"Bearer {token}"},
                    open_timeout=self._open_timeout,
                    **self._connect_options,
                ) as ws:
                    self._ws = ws
                    async with contextlib.aclosing(self._session(ws)) as frames:
                        async for item in frames:
                            if item is None:  # the welcome
                                welcomed = True
                                failures = 0
                                continue
                            yield item
                code, reason = _close_of(ws)
            except websockets.ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (None, "connection lost")
            except websockets.InvalidStatus as exc:
                status = exc.response.status_code
                if status not in (429, 502, 503, 504):
                    self.state = "closed"
                    raise ListenerError(f"handshake refused with HTTP {status}", status) from exc
                reason = f"HTTP {status}"
            except (OSError, TimeoutError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
                if isinstance(exc, websockets.InvalidURI):
                    raise ListenerError(f"invalid URL {self.url!r}") from exc
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._ws = None
            if self._stopped:
                break
            if code == _CLOSE_NORMAL:
                break
            if code in _CLOSE_FATAL:
                self.state = "closed"
                raise ListenerError(f"closed with {code}: {_CLOSE_FATAL[code]}", code)
            if code == _CLOSE_DISCONNECTED:
                self.state = "closed"
                self._token = None
                raise Disconnected(
                    f"closed with 4403: {reason or 'disconnected by the server'}; not reconnecting with this token",
                    _CLOSE_DISCONNECTED,
                )
            if code == _CLOSE_UNAUTHORIZED:
                await self._new_token_or_raise(reason)
            if not welcomed:
                failures += 1
            if self._max_attempts is not None and failures >= self._max_attempts:
                self.state = "closed"
                raise ListenerError(f"gave up after {failures} failed connection attempts: {reason or code}", code)
            delay = _full_jitter(self._backoff_base, self._backoff_max, failures)
            if code == _CLOSE_RESTART:  # the replica is draining: come back soon, but not all at once
                delay = random.uniform(0.05, max(0.1, self._backoff_base))
            elif code == _CLOSE_TOO_MANY:
                delay = max(delay, random.uniform(self._backoff_base, self._backoff_max))
            self.state = "backoff"
            logger.info("socket closed (%s %s); reconnecting in %.2fs", code, reason, delay)
            await asyncio.sleep(delay)
        self.state = "closed"

    async def _session(self, ws: Any) -> AsyncIterator[Notification | None]:
        """Frames of one socket: None for the welcome, then notifications (deduped, in order per stream)."""
        refresher: asyncio.Task[None] | None = None
        self._membership.attach(ws)
        try:
            async for raw in ws:
                if not isinstance(raw, str):
                    continue
                try:
                    frame = json.loads(raw)
                except ValueError:
                    continue
                kind = frame.get("type") if isinstance(frame, dict) else None
                if kind == "notification":
                    notification = self._cursors.accept(frame)
                    if notification is not None:
                        yield notification
                elif kind == "welcome":
                    self.state = "open"
                    self.connection_id = frame.get("connection_id")
                    self._cursors.on_welcome(frame)
                    self._membership.join_all()
                    yield None
                    if frame.get("recovered") is False:
                        for notification in await self._refetch():
                            yield notification
                    refresher = self._schedule_refresh(ws, refresher, frame.get("expires_at"))
                elif kind == "joined":
                    self._membership.on_joined(frame)
                elif kind == "left":
                    self._membership.on_left(frame)
                elif kind == "refreshed":
                    refresher = self._schedule_refresh(ws, refresher, frame.get("expires_at"))
                elif kind == "resync":
                    for notification in await self._refetch():
                        yield notification
                elif kind == "error":
                    try:
                        answered_a_join = self._membership.on_error(frame)
                    except TopicRefused:
                        self.state = "closed"
                        raise
                    if not answered_a_join:
                        logger.warning("server error frame: %s %s", frame.get("code"), frame.get("message"))
        finally:
            if refresher is not None:
                refresher.cancel()
            self._membership.detach()

    def _connect_url(self, url: str) -> str:
        """The URL with the resume cursors: each stream's own, and none for a stream without one."""
        cursors = [(k, v) for k, v in (("since", self.last_id), ("broadcast_since", self.last_broadcast_id)) if v]
        if not cursors:
            return url
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("since", "broadcast_since")]
        return urlunsplit(parts._replace(query=urlencode(query + cursors)))

    async def _new_token_or_raise(self, reason: str) -> None:
        rejected = self._token
        self._token = None
        if isinstance(self._token_source, str):
            self.state = "closed"
            raise Unauthorized(f"closed with 4401: {reason or 'unauthorized'}", _CLOSE_UNAUTHORIZED)
        try:
            fresh = await _resolve(self._token_source)
        except Exception as exc:
            self.state = "closed"
            raise Unauthorized(f"closed with 4401 ({reason}) and the token callable failed: {exc}", 4401) from exc
        if not fresh or fresh == rejected:
            self.state = "closed"
            raise Unauthorized(f"closed with 4401: {reason or 'unauthorized'}; no new token", _CLOSE_UNAUTHORIZED)
        self._token = fresh

    def _schedule_refresh(
        self, ws: Any, current: asyncio.Task[None] | None, expires_at: Any
    ) -> asyncio.Task[None] | None:
        """With a token callable, send a `refresh` frame `refresh_margin` seconds before `exp`."""
        if current is not None:
            current.cancel()
        if isinstance(self._token_source, str) or not isinstance(expires_at, int | float):
            return None
        lifetime = expires_at - time.time()
        delay = max(0.0, lifetime - min(self._refresh_margin, lifetime / 3))

        async def refresh() -> None:
            await asyncio.sleep(delay)
            try:
                token = await _resolve(self._token_source)
                await ws.send(json.dumps({"type": "refresh", "token": token}))
                self._token = token
            except Exception as exc:  # noqa: BLE001 - the server closes with 4401 at exp; handled there
                logger.warning("token refresh failed: %s", exc)

        return asyncio.get_running_loop().create_task(refresh())

    async def _refetch(self) -> list[Notification]:
        """After ``recovered: false`` or ``resync``: what the inbox holds that was not yielded yet."""
        if not self._refetch_on_gap or self.url is None or self._token is None:
            return []
        return await self._cursors.refetch(self.url, self._token, self._open_timeout)


def listen(
    url: str | Sequence[str],
    token: TokenSource,
    *,
    since: str | None = None,
    broadcast_since: str | None = None,
    topics: Iterable[str] = (),
    **options: Any,
) -> Listener:
    """Notifications of the token's user, forever: ``async for n in listen(url, token): ...``.

    ``url``: ``ws://host:port/ws`` (``http(s)://host:port`` works too), or a list of them tried in
    turn on each reconnect. ``token``: a JWT, or a callable (sync or async) returning one; with a
    callable the listener refreshes the token before it expires and, on 4401, retries only when
    the callable returns a different token. ``since`` / ``broadcast_since``: resume the user's
    stream / the broadcast stream after these ids on the first connection too (each is an id of
    its own stream). ``topics``: topics to join on every socket; their messages are yielded too
    (``Notification.topic``). Other options: see :class:`Listener`.

    Raises :class:`Unauthorized` on 4401 without a new token, :class:`Disconnected` on 4403,
    :class:`TopicRefused` when a topic cannot be joined, :class:`ListenerError` on a refused
    handshake, 1009 or after ``max_attempts`` failed connects in a row (default: never gives up).
    A server's 1000 close ends the iteration."""
    return Listener(url, token, since=since, broadcast_since=broadcast_since, topics=topics, **options)


def _ws_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"not a WebSocket or HTTP URL: {url!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _close_of(ws: Any) -> tuple[int | None, str]:
    """The close code and reason the server sent (None when the connection just dropped)."""
    protocol = getattr(ws, "protocol", ws)
    received = getattr(protocol, "close_rcvd", None)
    if received is None:
        return None, "connection lost"
    return int(received.code), str(received.reason)
