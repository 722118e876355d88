"""Streams: what a notification is published to, and what a socket receives.

A user's notifications, the broadcast notifications and each topic's messages are one kind of
thing: a stream, with an exact channel, a bounded history, an id sequence of its own and local
subscribers. A stream is named by a short string, which is also its hash tag in Redis (so every
key of one stream lives in one cluster slot):

- `u:<user>`: one user's notifications;
- `b`: notifications for everyone;
- `t:<topic>`: a topic's messages.

Ids increase within a stream only; nothing compares ids of two streams.
"""

from __future__ import annotations

from dataclasses import dataclass

BROADCAST = "b"
_USER = "u:"
_TOPIC = "t:"


def user_stream(user_id: str) -> str:
    return _USER + user_id


def topic_stream(topic: str) -> str:
    return _TOPIC + topic


def user_of(stream: str) -> str | None:
    """The user whose stream this is; None for the broadcast stream and topics."""
    return stream[2:] if stream.startswith(_USER) else None


def topic_of(stream: str) -> str | None:
    """The topic this stream carries; None for users and broadcasts."""
    return stream[2:] if stream.startswith(_TOPIC) else None


def is_topic(stream: str) -> bool:
    return stream.startswith(_TOPIC)


@dataclass(frozen=True, slots=True)
class StreamRules:
    """What sets one stream apart: presence events to members, the leave grace, a member cap, its
    own history bounds (None: the global ones), and how many topics of its namespace may hold
    history at once (None: no limit)."""

    events: bool = False
    grace_ms: int = 0
    max_members: int | None = None
    history_size: int | None = None
    history_ttl_ms: int | None = None
    max_topics: int | None = None
    namespace: str = ""
