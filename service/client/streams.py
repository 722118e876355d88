"""What the listener yields, and whether it is new: a Notification per frame, the resume cursor of
each stream, the (stream, id) pairs already yielded, and the inbox fetched to fill a gap.

Kept apart from the socket's lifecycle (service/client/listener.py) because all of it outlives the socket:
a replay after a reconnect, or the inbox refetched after a gap, repeats what an earlier socket
delivered, and only the cursors and the ids remembered across sockets tell it apart.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

logger = logging.getLogger("service.client")


@dataclass(frozen=True, slots=True)
class Notification:
    """One notification as the socket delivered it; ``frame`` is the whole JSON frame.

    ``topic`` is set for a topic's messages, with ``sender`` the member who published it (None when
    a backend did). Ids are ordered and unique only within one stream (see ``stream``)."""

    id: str
    event: str
    data: Any
    ts: int
    broadcast: bool = False
    frame: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    topic: str | None = None
    sender: str | None = None

    @property
    def stream(self) -> str:
        """The stream it came from: ``"user"``, ``"broadcast"`` or ``"topic:<topic>"``.

        Named from the receiver's side, and the names this client keys its cursors and duplicates by.
        The server's own names for them (``u:<user>``, ``b``, ``t:<topic>``) are internal: they appear
        only in its Redis keys and channels, never in the API or a frame."""
        return stream_of(self.topic, self.broadcast)

    @classmethod
    def from_frame(cls, frame: Mapping[str, Any]) -> Notification:
        topic = frame.get("topic")
        sender = frame.get("from")
        return cls(
            id=str(frame["id"]),
            event=str(frame["event"]),
            data=frame.get("data"),
            ts=int(frame.get("ts", 0)),
            broadcast=bool(frame.get("broadcast", False)),
            frame=dict(frame),
            topic=str(topic) if topic is not None else None,
            sender=str(sender) if sender is not None else None,
        )


# Dedupe keys: a stream (as `Notification.stream` names it) and an id (ids of two streams may be equal).
_USER, _BROADCAST, _TOPIC = "user", "broadcast", "topic:"


def stream_of(topic: str | None, broadcast: bool) -> str:
    if topic is not None:
        return _TOPIC + topic
    return _BROADCAST if broadcast else _USER


def _key(id_: str) -> tuple[int, int]:
    ms, _, seq = id_.partition("-")
    try:
        return int(ms), int(seq)
    except ValueError:
        return (0, 0)


class StreamCursors:
    """The resume cursors of one :class:`~service.client.Listener` (``last_id``, ``last_broadcast_id``
    and the topics' own in ``topic_ids``) and the last ``window`` (stream, id) pairs it yielded.

    ``topic_ids`` is its TopicMembership's ``last_ids``, shared rather than copied: the membership
    drops the entry of a topic this user was removed from, and that topic's messages must stop here
    too."""

    def __init__(
        self, since: str | None, broadcast_since: str | None, topic_ids: dict[str, str | None], window: int
    ) -> None:
        self.last_id = since
        self.last_broadcast_id = broadcast_since
        self._topic_ids = topic_ids
        self._seen: set[tuple[str, str]] = set()
        self._seen_order: deque[tuple[str, str]] = deque()
        self._window = window

    def on_welcome(self, frame: Mapping[str, Any]) -> None:
        """The welcome's cursors, present when not resuming: a stream nothing was seen of yet
        resumes from there on a reconnect."""
        if self.last_id is None and isinstance(frame.get("cursor"), str):
            self.last_id = frame["cursor"]
        if self.last_broadcast_id is None and isinstance(frame.get("broadcast_cursor"), str):
            self.last_broadcast_id = frame["broadcast_cursor"]

    def accept(self, frame: dict[str, Any]) -> Notification | None:
        """The notification, or None when already seen (by stream and id, or behind its stream's cursor)."""
        id_ = frame.get("id")
        if not isinstance(id_, str):
            return None
        topic = frame.get("topic")
        if topic is not None:
            if not isinstance(topic, str) or topic not in self._topic_ids:
                return None  # a topic this listener left or was removed from
            cursor = self._topic_ids[topic]
        else:
            cursor = self.last_broadcast_id if frame.get("broadcast") else self.last_id
        stream = stream_of(topic, bool(frame.get("broadcast")))
        if (stream, id_) in self._seen or (cursor is not None and _key(id_) <= _key(cursor)):
            return None
        try:
            notification = Notification.from_frame(frame)
        except (KeyError, TypeError, ValueError):
            return None
        self._remember((stream, id_))
        if topic is not None:
            self._topic_ids[topic] = id_
        elif stream == _BROADCAST:
            self.last_broadcast_id = id_
        else:
            self.last_id = id_
        return notification

    async def refetch(self, ws_url: str, token: str, http_timeout: float) -> list[Notification]:
        """After a gap the server could not replay: the user's inbox entries newer than the cursor."""
        parts = urlsplit(ws_url)
        scheme = "https" if parts.scheme == "wss" else "http"
        base_path = parts.path[: -len("/ws")] if parts.path.endswith("/ws") else parts.path.rstrip("/")
        url = urlunsplit((scheme, parts.netloc, base_path + "/me/notifications", "limit=100", ""))
        try:
            async with httpx.AsyncClient(timeout=http_timeout) as http:
                response = await http.get(url, headers={"Authorization": f"Bearer {token}"})
            response.raise_for_status()
            frames = response.json()["notifications"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            logger.warning("could not refetch the inbox after a gap: %s", exc)
            return []
        fresh = []
        for frame in sorted(frames, key=lambda f: _key(str(f.get("id", "")))):
            notification = self.accept(frame)
            if notification is not None:
                fresh.append(notification)
        return fresh

    def _remember(self, key: tuple[str, str]) -> None:
        self._seen.add(key)
        self._seen_order.append(key)
        while len(self._seen_order) > self._window:
            self._seen.discard(self._seen_order.popleft())
