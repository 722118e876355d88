"""The listener's topics: which it follows, the cursor of each, and its membership on the current socket.

Kept apart from the socket's lifecycle (service/client/listener.py) because a topic outlives every socket:
its cursor and whether it is still followed carry over a reconnect, where it is joined again with
its own ``since``, while what the socket is a member of starts empty each time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

from .common import TokenSource, TopicRefused, _resolve

logger = logging.getLogger("service.client")


class _Pacer:
    """Keeps this client's frames under the server's inbound rate (it closes with 4029 above it).

    Here because the joins are what would go over it: a welcome joins every topic at once."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._tokens = rate
        self._updated = time.monotonic()

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            self._tokens = min(self._rate, self._tokens + (now - self._updated) * self._rate)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self._rate)


class TopicMembership:
    """The topics of one :class:`~service.client.Listener` (its options ``topics``, ``topic_tokens``,
    ``topic_since``, ``send_rate``); the listener exposes ``topics``, ``last_ids`` (as ``last_topic_ids``), ``gaps``
    (as ``topic_gaps``), ``info`` (as ``topic_info``) and ``joined``, and hands it every socket and every
    membership frame."""

    def __init__(
        self,
        topics: Iterable[str],
        topic_tokens: Mapping[str, TokenSource] | None,
        topic_since: Mapping[str, str] | None,
        send_rate: float,
    ) -> None:
        if isinstance(topics, str):
            raise TypeError("topics is a list of topic names, not one string")
        self.topics: list[str] = list(dict.fromkeys(topics))
        unknown = set(topic_since or {}).union(topic_tokens or {}).difference(self.topics)
        if unknown:
            raise ValueError(f"topic_since / topic_tokens name topics not in topics: {sorted(unknown)}")
        # Also what is still followed: a join in flight, or a message arriving, for a topic the server
        # removed this user from finds no entry and is dropped.
        self.last_ids: dict[str, str | None] = {t: (topic_since or {}).get(t) for t in self.topics}
        self.gaps = 0
        # topic -> the `info` its latest `joined` carried (what the namespace's join hook answered).
        self.info: dict[str, Any] = {}
        self._tokens = dict(topic_tokens or {})
        self._send_rate = send_rate
        self._ws: Any = None  # the current socket and its pacer, from attach()
        self._pacer: _Pacer
        self._joining: set[str] = set()  # join sent on this socket, no answer yet
        self._joined: set[str] = set()  # topics this socket is a member of
        self._senders: set[asyncio.Task[None]] = set()

    @property
    def joined(self) -> frozenset[str]:
        return frozenset(self._joined)

    def attach(self, ws: Any) -> None:
        """A new socket: a member of nothing until the server says so."""
        self._ws, self._pacer = ws, _Pacer(self._send_rate)
        self._joining, self._joined = set(), set()

    def join_all(self) -> None:
        """On the welcome: every topic is joined again, each resuming from its own cursor."""
        for topic in self.topics:
            self._join_later(topic)

    def detach(self) -> None:
        """The socket is gone: a join still waiting to be sent would go to a dead socket."""
        for task in list(self._senders):
            task.cancel()

    def _join_later(self, topic: str, delay: float = 0.0) -> None:
        task = asyncio.get_running_loop().create_task(self._join(self._ws, self._pacer, topic, delay))
        self._senders.add(task)
        task.add_done_callback(self._senders.discard)

    async def _join(self, ws: Any, pacer: _Pacer, topic: str, delay: float) -> None:
        """Send `join` for a topic, resuming after the last id seen in it (or its first `joined` cursor)."""
        if delay:
            await asyncio.sleep(delay)
        await pacer.wait()
        if topic not in self.last_ids:  # removed meanwhile
            return
        frame: dict[str, Any] = {"type": "join", "topic": topic}
        topic_token = self._tokens.get(topic)
        while topic_token is not None:
            try:
                frame["token"] = await _resolve(topic_token)
                break
            except Exception as exc:  # noqa: BLE001 - the caller's callable; try again while the socket lives
                logger.warning("join %s: the topic token callable failed: %s", topic, exc)
                await asyncio.sleep(random.uniform(1.0, 3.0))
        since = self.last_ids.get(topic)  # read last: nothing of this topic arrives before the join
        if since is not None:
            frame["since"] = since
        self._joining.add(topic)
        try:
            await ws.send(json.dumps(frame))
        except Exception as exc:  # noqa: BLE001 - the socket is closing; the next one joins again
            logger.info("join %s not sent: %s", topic, exc)

    def on_joined(self, frame: dict[str, Any]) -> None:
        topic = frame.get("topic")
        if not isinstance(topic, str) or topic not in self.last_ids:
            return
        self._joining.discard(topic)
        self._joined.add(topic)
        if "info" in frame:
            self.info[topic] = frame["info"]
        else:
            self.info.pop(topic, None)
        cursor = frame.get("cursor")
        if self.last_ids[topic] is None and isinstance(cursor, str):
            self.last_ids[topic] = cursor
        if frame.get("recovered") is False:
            self.gaps += 1
            logger.warning("topic %s: some messages after the cursor are no longer retained", topic)

    def on_left(self, frame: dict[str, Any]) -> None:
        topic = frame.get("topic")
        if not isinstance(topic, str):
            return
        self._joining.discard(topic)
        self._joined.discard(topic)
        if frame.get("reason") == "removed" and topic in self.last_ids:
            logger.warning("removed from topic %s by the server; not joining it again", topic)
            self.topics.remove(topic)
            del self.last_ids[topic]
            self.info.pop(topic, None)

    def on_error(self, frame: dict[str, Any]) -> bool:
        """False when the error frame does not answer one of our joins. An ``unavailable`` join is
        retried later; one that retrying cannot help raises :class:`TopicRefused`."""
        topic = frame.get("topic")
        if not isinstance(topic, str) or topic not in self._joining:
            return False
        self._joining.discard(topic)
        code, message = str(frame.get("code")), str(frame.get("message", ""))
        if code == "already_joined":
            self._joined.add(topic)
        elif code == "unavailable":
            logger.info("join %s failed (%s); retrying", topic, message)
            # Jittered, so the members of a topic that was unavailable do not all come back at once.
            self._join_later(topic, random.uniform(0.5, 2.0))
        else:
            reason = frame.get("reason")
            raise TopicRefused(topic, code, message, reason if isinstance(reason, str) else None)
        return True
