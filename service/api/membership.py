"""Topic frames on the client socket: join, leave, publish, signal and presence.

Every permission is checked here from the connection's token (or a topic token it presents),
never from what a frame claims; `from` is set from the token too.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import orjson

from ..broker import TopicFull
from ..config.topic_options import TopicOptions
from ..core.errors import BrokerUnavailable, InvalidToken, NamespaceFull
from ..core.frames import BadFrame, encode
from ..core.ids import IdKey, parse_id
from ..core.ratelimit import TokenBucket
from ..core.streams import topic_stream
from ..core.topics import TopicError
from ..delivery.connection import Connection
from ..delivery.hub import SIGNAL, control
from .hooks import HookRefused, Hooks, HookUnavailable
from .runtime import Runtime
from .session import replay

T = TypeVar("T")

MEMBERS_SHOWN = 1000
# A socket's presence asks: NOTIFY_PRESENCE_RATE a second, bursts of this many times that.
_PRESENCE_BURST = 5
_EVENT = re.compile(r"[^\x00-\x1f\x7f]{1,128}")

TOPIC_FRAMES = frozenset({"join", "leave", "publish", "signal", "presence"})


async def handle(
    frame: dict[str, Any], conn: Connection, runtime: Runtime, admitted: Mapping[str, Any] | None = None
) -> None:
    """Act on one topic frame; BadFrame (carrying the topic) for anything refused.

    A frame that asks a hook is answered only after the hook (within NOTIFY_HOOK_TIMEOUT_SECONDS),
    and the socket's later frames wait for it: a socket's frames are answered in the order sent
    (clients match answers to frames by that order, and a publish right after a join needs the
    membership). Deliveries to the socket, and every other socket, go on meanwhile.
    `admitted`: joins decided already (topic -> the join hook's info), as by the SSE route."""
    kind, topic = frame["type"], frame.get("topic")
    try:
        options = runtime.topics.options(topic)
    except TopicError as exc:
        raise BadFrame(exc.code, exc.message, topic if isinstance(topic, str) else None) from None
    assert isinstance(topic, str)
    member = conn.topics is not None and topic in conn.topics
    if kind == "join":
        await _join(frame, topic, options, conn, runtime, admitted)
    elif kind == "leave":
        await runtime.hub.leave(conn, topic)
        runtime.member_lists.forget(topic_stream(topic))
        conn.send(encode({"type": "left", "topic": topic}))
    elif not member:
        raise BadFrame("forbidden", f"join {topic!r} first", topic)
    elif kind == "publish":
        if not options.publish:
            raise BadFrame("forbidden", "members may not publish in this namespace", topic)
        event, data = _message(frame, topic)
        rates = runtime.member_publish_rate
        if rates is not None and (wait := rates.take(conn.user_id)):
            raise BadFrame("rate_limited", f"a user may publish {rates.rate:g} messages a second", topic, wait)
        if options.publish_hook is not None:
            # Nothing is published unless the hook said 200; its `data`, when it gave one, instead.
            hooks = _hooks(runtime)
            asked = hooks.publish(str(options.publish_hook), conn.user_id, topic, frame["event"], frame.get("data"))
            data = await _hook_answer(asked, topic)
        try:
            published = await runtime.broker.publish(topic_stream(topic), event, data, None, sender=conn.user_id)
        except NamespaceFull as exc:
            raise BadFrame(exc.code, exc.message, topic) from None
        except BrokerUnavailable as exc:
            raise BadFrame("unavailable", exc.message, topic) from None
        runtime.metrics.published_topic.inc()
        if runtime.webhooks is not None and runtime.webhooks.wants("topic.message"):
            message = {"topic": topic, "id": published.id, "from": conn.user_id}
            message.update(event=orjson.loads(event), data=orjson.loads(data), ts=published.ts)
            # Queued before the member hears `published`: told to the backend at least once.
            await runtime.webhooks.emit("topic.message", message, topic_stream(topic))
        conn.send(encode({"type": "published", "topic": topic, "id": published.id}))
    elif kind == "signal":
        if not options.signals:
            raise BadFrame("forbidden", "signals are off in this namespace", topic)
        event, data = _message(frame, topic)
        signal = f'{{"type":"signal","topic":{orjson.dumps(topic).decode()},"event":{event},"data":{data},'
        signal += f'"from":{orjson.dumps(conn.user_id).decode()}}}'
        try:
            await runtime.broker.send(topic_stream(topic), control(SIGNAL, conn.id, signal))
        except BrokerUnavailable as exc:
            raise BadFrame("unavailable", exc.message, topic) from None
    else:  # presence
        if not options.presence:
            raise BadFrame("forbidden", "presence is off in this namespace", topic)
        rate = runtime.settings.presence_rate
        if conn.presence_asks is None:
            conn.presence_asks = TokenBucket(rate, rate * _PRESENCE_BURST)
        wait = conn.presence_asks.take()
        if wait:
            raise BadFrame("rate_limited", f"a socket may ask for member lists {rate:g} times a second", topic, wait)
        try:
            users, count = await runtime.member_lists.get(topic_stream(topic))
        except BrokerUnavailable as exc:
            raise BadFrame("unavailable", exc.message, topic) from None
        conn.send(encode({"type": "members", "topic": topic, "users": users, "count": count}))


async def _join(
    frame: dict[str, Any],
    topic: str,
    options: TopicOptions,
    conn: Connection,
    runtime: Runtime,
    admitted: Mapping[str, Any] | None,
) -> None:
    if conn.topics is not None and topic in conn.topics:
        raise BadFrame("already_joined", f"this socket is already a member of {topic!r}", topic)
    if conn.topics is not None and len(conn.topics) >= runtime.settings.max_topics_per_connection:
        limit = runtime.settings.max_topics_per_connection
        raise BadFrame("too_many_topics", f"a socket may be in at most {limit} topics", topic)
    since = frame.get("since")
    if since is not None and (not isinstance(since, str) or parse_id(since) is None):
        raise BadFrame("invalid_cursor", "since is not a notification id", topic)
    if admitted is not None and topic in admitted:
        info = admitted[topic]
    else:
        info = await _admit(frame, topic, options, conn, runtime)
    stream = topic_stream(topic)
    conn.hold(stream)  # the topic's live frames wait until `joined` (and any replay) is queued
    try:
        count = await runtime.hub.join(conn, topic, runtime.topics.rules(topic))
    except TopicFull:
        conn.release([], {}, stream)
        raise BadFrame("full", f"{topic!r} has its maximum number of members", topic) from None
    except BrokerUnavailable as exc:
        conn.release([], {}, stream)
        raise BadFrame("unavailable", exc.message, topic) from None
    runtime.member_lists.forget(stream)  # the joiner, asking next, finds itself listed
    joined: dict[str, Any] = {"type": "joined", "topic": topic}
    floors: dict[str, IdKey] = {}
    frames: list[str] = []
    if since is not None:
        page = await replay(runtime, stream, since, floors)
        joined["recovered"] = page.recovered
        frames = page.frames
    cursor = runtime.broker.position(stream)
    if cursor is not None:
        joined["cursor"] = cursor
    if options.presence:
        joined["count"] = count
    if info is not None:
        joined["info"] = info
    conn.release([encode(joined), *frames], floors, stream)


async def _admit(frame: dict[str, Any], topic: str, options: TopicOptions, conn: Connection, runtime: Runtime) -> Any:
    """Whether the join may go ahead, from the tokens and then the join hook; the hook's `info`."""
    topic_token = None
    if frame.get("token") is not None:
        try:
            topic_token = await runtime.verifier.verify(frame["token"] if isinstance(frame["token"], str) else None)
        except InvalidToken as exc:
            raise BadFrame("forbidden", f"topic token refused: {exc.message}", topic) from None
    if not runtime.topics.may_join(topic, options, conn.user_id, conn.grants, topic_token):
        raise BadFrame("forbidden", f"this token does not permit joining {topic!r}", topic)
    if options.join_hook is None:
        return None
    # The claims of the token that let the join through: the topic token's when one came.
    claims = topic_token.claims if topic_token is not None else (conn.claims or {})
    return await _hook_answer(_hooks(runtime).join(str(options.join_hook), conn.user_id, topic, claims), topic)


def _hooks(runtime: Runtime) -> Hooks:
    assert runtime.hooks is not None  # made by the lifespan whenever a namespace names a hook
    return runtime.hooks


async def _hook_answer(asked: Awaitable[T], topic: str) -> T:
    """A hook's answer, or the error frame its refusal or silence comes to."""
    try:
        return await asked
    except HookRefused as exc:
        raise BadFrame("forbidden", exc.message, topic, reason=exc.reason) from None
    except HookUnavailable as exc:
        raise BadFrame("unavailable", exc.message, topic) from None


def _message(frame: dict[str, Any], topic: str) -> tuple[str, str]:
    """The event and data of a publish or signal frame, as JSON."""
    event = frame.get("event")
    if not isinstance(event, str) or not _EVENT.fullmatch(event):
        raise BadFrame("invalid_frame", '"event" must be 1 to 128 characters, no control characters', topic)
    try:
        data = orjson.dumps(frame.get("data")).decode()
    except orjson.JSONEncodeError:
        raise BadFrame("invalid_frame", '"data" must be JSON whose integers fit in 64 bits', topic) from None
    return orjson.dumps(event).decode(), data
