"""Frames on the client socket, built and parsed without any socket; close codes."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import orjson

from .streams import topic_of


class CloseCode(IntEnum):
    """Close codes a client may see, and what each means."""

    NORMAL = 1000
    MESSAGE_TOO_BIG = 1009  # inbound frame over NOTIFY_MAX_INBOUND_BYTES
    SERVICE_RESTART = 1012  # replica draining: reconnect (with `since`) after a short random delay
    SLOW_CONSUMER = 4008  # the client did not read fast enough; reconnect with `since`
    UNAUTHORIZED = 4401  # missing, invalid or expired token: get a new token before reconnecting
    DISCONNECTED = 4403  # disconnected by the server (logout everywhere, a ban): do not reconnect with this token
    TOO_MANY = 4029  # too many sockets for this user, or too many frames per second


def encode(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def welcome(
    user_id: str,
    connection_id: str,
    recovered: bool | None,
    cursors: tuple[str | None, str | None],
    expires_at: float,
) -> str:
    """The first frame; `cursors`: where the user's and the broadcast stream stand on this replica."""
    frame: dict[str, Any] = {"type": "welcome", "user": user_id, "connection_id": connection_id}
    if recovered is not None:
        frame["recovered"] = recovered
    if cursors[0] is not None:
        frame["cursor"] = cursors[0]
    if cursors[1] is not None:
        frame["broadcast_cursor"] = cursors[1]
    frame["expires_at"] = int(expires_at)
    return encode(frame)


def error(
    code: str, message: str, topic: str | None = None, retry_after: float | None = None, reason: str | None = None
) -> str:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if topic is not None:
        frame["topic"] = topic
    if retry_after is not None:
        frame["retry_after"] = round(retry_after, 3)
    if reason is not None:
        frame["reason"] = reason
    return encode(frame)


# ASGI scope extensions through which this service's server offers `send_frame(wire) -> bool`,
# `send_eagerly(send) -> Awaitable | None` (service/server/seams.py), and an object whose
# `direct_write` is the socket's write while a frame may go straight to it (else None): the
# fan-out's path, with no call to ask first (service/server/wsprotocol.py).
SEND_FRAME_EXTENSION = "notify.send_frame"
SEND_EAGERLY_EXTENSION = "notify.send_eagerly"
DIRECT_WRITE_EXTENSION = "notify.direct_write"


def wire_text(text: str) -> bytes:
    """A complete, unmasked WebSocket text frame (server to client) carrying `text`.

    Built once per notification, so a server that can write it directly (the `notify.send_frame`
    scope extension) sends the same bytes to every socket."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 65536:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


PONG = '{"type":"pong"}'
RESYNC = '{"type":"resync"}'


def resync(stream: str) -> str:
    """What a stream's sockets get when its gap could not be replayed: refetch (a topic's history)."""
    topic = topic_of(stream)
    return RESYNC if topic is None else encode({"type": "resync", "topic": topic})


class BadFrame(Exception):
    """An inbound frame the server cannot act on; answered with an error frame."""

    def __init__(
        self,
        code: str,
        message: str,
        topic: str | None = None,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.topic = topic  # the topic a refused topic frame named
        self.retry_after = retry_after  # rate_limited: seconds until the frame would be taken
        self.reason = reason  # a hook's refusal: the `reason` the backend gave, for the user

    def frame(self) -> str:
        """The error frame answering it."""
        return error(self.code, self.message, self.topic, self.retry_after, self.reason)


def parse_client_frame(text: str) -> dict[str, Any]:
    """A client frame as a dict with a string `type`, or BadFrame."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadFrame("invalid_json", "frame is not valid JSON") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise BadFrame("invalid_frame", 'frame must be a JSON object with a string "type"')
    return frame
