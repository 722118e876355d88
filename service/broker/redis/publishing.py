"""The publish script's KEYS and ARGV (in the order `scripts.PUBLISH` reads them), encoded in one step.

A publish is the hot path: its ten or so arguments are two %-formats here rather than an encoding
call each, and what every user's (or the broadcast's) frame shares is encoded once, at import.
"""

from __future__ import annotations

import hashlib

from ...core.streams import BROADCAST, user_of, user_stream
from ..base import frame_parts
from .resp import bulk

_FLAG = {False: bulk("0"), True: bulk("1")}
# What a publish answers counting, by the stream's kind: a user's sockets, a topic's members, nothing.
_COUNTED = {"u": "=", "t": "#", "b": ""}
# Every user's frame parts (`frame_parts`) and the broadcast's, encoded once.
_USER_PARTS = b"".join(map(bulk, frame_parts(user_stream("-"))))
_BROADCAST_PARTS = b"".join(map(bulk, frame_parts(BROADCAST)))


def _parts(stream: str, user: str | None, sender: str | None) -> bytes:
    """The frame's parts as the publish command's two arguments (`user`: the stream's, if a user's)."""
    if user is not None:
        return _USER_PARTS
    if stream == BROADCAST:
        return _BROADCAST_PARTS
    return b"".join(map(bulk, frame_parts(stream, sender)))


def publish_keys(tag: str, idempotency_key: str | None) -> bytes:
    """KEYS: the stream's four one-letter keys share its tag (`tag`: its key with an empty suffix), as
    does its idempotency key (the caller's, hashed; else `i:-`)."""
    prefix = tag.encode()
    one = b"$%d\r\n%b" % (len(prefix) + 1, prefix)
    idem = prefix + (
        b"i:" + hashlib.sha256(idempotency_key.encode()).hexdigest().encode() if idempotency_key else b"i:-"
    )
    return b"%bh\r\n%bc\r\n%bn\r\n$%d\r\n%b\r\n%bm\r\n" % (one, one, one, len(idem), idem, one)


def publish_args(
    stream: str, event_json: str, data_json: str, bounds: bytes, idempotent: bool, sender: str | None
) -> bytes:
    """ARGV: the frame's event and data, the stream's bounds (`bounds`: history length, age and
    idempotency window, already encoded), whether a key guards it, the frame's parts, what to count."""
    event, data, user = event_json.encode(), data_json.encode(), user_of(stream)
    return b"$%d\r\n%b\r\n$%d\r\n%b\r\n%b%b%b%b" % (
        len(event),
        event,
        len(data),
        data,
        bounds,
        _FLAG[idempotent],
        _parts(stream, user, sender),
        bulk(_COUNTED[stream[0]] + (user or "")),
    )
