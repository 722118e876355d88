"""Notification ids and user ids.

A notification id is `<unix ms>-<seq>`, which is also its Redis stream id. Each stream (a user's,
the broadcasts, a topic: see streams.py) has its own sequence: `seq` counts up and `ms` never goes
backwards within it, so `(ms, seq)` orders two ids of one stream the way they were published, even
after the stream's counter expired or Redis lost its data and it started again. Ids of two streams
are never compared.
"""

from __future__ import annotations

import re

IdKey = tuple[int, int]

_ID = re.compile(r"^([0-9]{1,15})-([0-9]{1,19})$")
# 1 to 256 characters, none of them whitespace, a control character (C0, DEL, C1) or a lone
# surrogate: an id must encode as UTF-8, or its channel, its keys and its frames cannot be written.
_USER_ID = re.compile(r"^[^\s\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,256}$")

USER_ID_RULE = "1 to 256 characters of valid Unicode, no whitespace or control characters"


def parse_id(value: str) -> IdKey | None:
    """The order key of a well-formed id, else None."""
    match = _ID.fullmatch(value)
    return (int(match.group(1)), int(match.group(2))) if match else None


def id_key(value: str) -> IdKey:
    """The order key of an id this service made (no validation)."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


def is_valid_user_id(value: str) -> bool:
    """User ids are 1-256 characters without whitespace, control characters or lone surrogates;
    globs are ordinary."""
    return bool(_USER_ID.fullmatch(value))


def is_ahead(after: IdKey, newest: IdKey | None, now_ms: int) -> bool:
    """Whether a cursor is past every id and cursor its stream gave: past its newest id (if any),
    in a millisecond still to come."""
    return after[0] > now_ms and (newest is None or after > newest)


def is_recoverable(after: IdKey, max_deleted: IdKey, now_ms: int, ttl_ms: int) -> bool:
    """Whether everything after `after` is still retained.

    True when no entry after the cursor was trimmed, and the cursor is young enough that an
    idle stream cannot have expired with entries after it."""
    return after >= max_deleted and after[0] >= now_ms - ttl_ms
