"""An SSE stream's position: one cursor per stream it carries, in the one `Last-Event-ID`.

Ids only order notifications within a stream, so an event's `id:` is the list of positions of
every stream the SSE connection carries, comma-separated, in a fixed order: the user's stream, the
broadcast stream, then the topics in the order the `topics` query named them. An empty place is a
stream with nothing seen yet. A browser's EventSource sends the last one back by itself.
"""

from __future__ import annotations

import orjson

from ..broker import frame_id
from ..broker.base import BROADCAST_TAIL, NOTIFICATION_PREFIX
from ..core.ids import parse_id

_TOPIC_AT = '","topic":"'


class Position:
    """Where each stream of one SSE connection stands; also writes its events."""

    __slots__ = ("ids", "resumed")

    def __init__(self, ids: list[str | None], resumed: bool) -> None:
        self.ids = ids
        self.resumed = resumed

    @classmethod
    def parse(cls, value: str | None, topics: int) -> Position | None:
        """The position a client sent back (None when malformed); a single id, as older clients
        kept, resumes the user's and the broadcast stream from it."""
        places = 2 + topics
        if not value:
            return cls([None] * places, False)
        parts: list[str | None] = [part or None for part in value.split(",")]
        if len(parts) == 1:
            parts = [parts[0], parts[0]]
        if any(part is not None and parse_id(part) is None for part in parts):
            return None
        parts = (parts + [None] * places)[:places]
        return cls(parts, True)

    def event(self, frame: str, topics: list[str]) -> str:
        """The SSE event for one frame; notifications (and the cursors of welcome and joined)
        move the position and carry it as `id:`."""
        place = self._place(frame, topics)
        if place is None:
            return f"data: {frame}\n\n"
        return f"id: {','.join(id_ or '' for id_ in self.ids)}\ndata: {frame}\n\n"

    def _place(self, frame: str, topics: list[str]) -> int | None:
        if frame.startswith(NOTIFICATION_PREFIX):
            id_ = frame_id(frame)
            assert id_ is not None
            after = len(NOTIFICATION_PREFIX) + len(id_)
            if frame.startswith(_TOPIC_AT, after):
                topic = frame[after + len(_TOPIC_AT) : frame.index('"', after + len(_TOPIC_AT))]
                place = 2 + topics.index(topic) if topic in topics else None
            else:
                place = 1 if frame.endswith(BROADCAST_TAIL) else 0
            if place is not None:
                self.ids[place] = id_
            return place
        if frame.startswith(('{"type":"welcome"', '{"type":"joined"')):
            body = orjson.loads(frame)
            if body["type"] == "welcome":
                self.ids[0] = self.ids[0] or body.get("cursor")
                self.ids[1] = self.ids[1] or body.get("broadcast_cursor")
                return 0
            if body.get("topic") in topics:
                place = 2 + topics.index(body["topic"])
                self.ids[place] = self.ids[place] or body.get("cursor")
                return place
        return None
