"""Topics: names, namespaces and who may join. No sockets or Redis in here.

A topic name is `namespace:rest` (the namespace ends at the first colon) or a bare `rest` (the
namespace ""). A topic exists only in a namespace configured in NOTIFY_TOPICS.
"""

from __future__ import annotations

import re
from typing import Protocol

from ..config.topic_options import TopicOptions
from .streams import StreamRules, topic_of

_NAME = re.compile(r"[A-Za-z0-9_\-.:@=]{1,200}")
NAME_RULE = "1 to 200 characters from A-Z a-z 0-9 _ - . : @ ="


class TopicGrant(Protocol):
    """What a verified topic token says (auth's Principal has both)."""

    @property
    def user_id(self) -> str: ...

    @property
    def topic(self) -> str | None: ...


class TopicError(Exception):
    """A topic that cannot be used; `code` is the error frame's code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_valid_topic_name(topic: str) -> bool:
    return bool(_NAME.fullmatch(topic))


def namespace_of(topic: str) -> str:
    return topic.partition(":")[0] if ":" in topic else ""


class Topics:
    """The configured namespaces, and the checks every topic name and join goes through."""

    def __init__(self, namespaces: dict[str, TopicOptions], grace_seconds: float) -> None:
        self._namespaces = namespaces
        self._grace_ms = int(grace_seconds * 1000)

    def options(self, topic: object) -> TopicOptions:
        """The options of a well-formed topic in a configured namespace; TopicError otherwise."""
        if not isinstance(topic, str) or not _NAME.fullmatch(topic):
            raise TopicError("invalid_topic", f"a topic name is {NAME_RULE}")
        options = self._namespaces.get(namespace_of(topic))
        if options is None:
            raise TopicError("unknown_namespace", f"no namespace {namespace_of(topic)!r} is configured")
        return options

    def presence_on(self, topic: str) -> bool:
        """Whether the topic's namespace shows its members (False outside the namespaces)."""
        options = self._namespaces.get(namespace_of(topic))
        return options is not None and options.presence

    def exists(self, topic: str) -> bool:
        """Whether the topic's namespace is configured (its name already checked)."""
        return namespace_of(topic) in self._namespaces

    def rules(self, topic: str) -> StreamRules:
        """How the broker keeps this topic (an unconfigured one: quietly, with global bounds)."""
        options = self._namespaces.get(namespace_of(topic))
        if options is None:
            return StreamRules(grace_ms=self._grace_ms)
        ttl = options.history_ttl_seconds
        return StreamRules(
            events=options.join_leave,
            grace_ms=self._grace_ms,
            max_members=options.max_members,
            history_size=options.history_size,
            history_ttl_ms=ttl and ttl * 1000,
            max_topics=options.max_topics,
            namespace=namespace_of(topic),
        )

    def stream_rules(self, stream: str) -> StreamRules:
        """`rules` by stream name, as the broker asks (users and broadcasts: the defaults)."""
        topic = topic_of(stream)
        return self.rules(topic) if topic is not None else StreamRules()

    @staticmethod
    def may_join(
        topic: str, options: TopicOptions, user_id: str, grants: tuple[str, ...], topic_token: TopicGrant | None
    ) -> bool:
        """Whether the connection's user may join: any user where the namespace says so (or leaves
        it to its join hook), else a `topics` claim of the connection token (exact, or `ns:*`), or a
        topic token for exactly this user and topic."""
        if options.join != "token":
            return True
        if topic_token is not None:
            return topic_token.user_id == user_id and topic_token.topic == topic
        namespace = namespace_of(topic)
        return any(
            granted == topic or (granted.endswith(":*") and granted[:-2] == namespace and ":" in topic)
            for granted in grants
        )
