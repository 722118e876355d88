"""PresenceEvents: joins and leaves, as the broker decides them, told as webhook events."""

from __future__ import annotations

from collections.abc import Callable

from ..core.streams import topic_of, user_of
from .webhooks import Webhooks

USER_TYPES = ("user.online", "user.offline")
TOPIC_TYPES = ("topic.occupied", "topic.vacated", "topic.member_added", "topic.member_removed")


class PresenceEvents:
    """The broker's presence watch: a user's own stream gives `user.online` (their first socket
    anywhere) and `user.offline` (their last one gone, after the grace); a topic gives
    `topic.occupied` and `topic.vacated` (first member in, last one out), and, in namespaces with
    presence on, `topic.member_added` and `topic.member_removed`."""

    def __init__(self, webhooks: Webhooks, presence_on: Callable[[str], bool]) -> None:
        self._webhooks = webhooks
        self._presence_on = presence_on

    @staticmethod
    def wanted(webhooks: Webhooks) -> bool:
        """Whether any endpoint wants a presence event (else presence is not watched at all)."""
        return any(webhooks.wants(t) for t in (*USER_TYPES, *TOPIC_TYPES))

    def changed(self, stream: str, action: str, user: str, members: int) -> None:
        emit = self._webhooks.emit_soon
        joined = action == "join"
        user_id = user_of(stream)
        if user_id is not None:
            emit(USER_TYPES[0] if joined else USER_TYPES[1], {"user": user_id}, stream)
            return
        topic = topic_of(stream)
        if topic is None:
            return
        if joined and members == 1:
            emit("topic.occupied", {"topic": topic}, stream)
        if self._presence_on(topic):
            emit("topic.member_added" if joined else "topic.member_removed", {"topic": topic, "user": user}, stream)
        if not joined and members == 0:
            emit("topic.vacated", {"topic": topic}, stream)
