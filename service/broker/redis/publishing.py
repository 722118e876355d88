"""The publish script: run on the shared pipeline (`PublishScript`), its KEYS and ARGV (in the order
`scripts.PUBLISH` reads them) encoded in one step, and its reply read.

A publish is the hot path: its ten or so arguments are two %-formats here rather than an encoding
call each, and what every user's (or the broadcast's) frame shares is encoded once, at import.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

from redis.exceptions import ResponseError

from ...core.ids import id_key
from ...core.streams import BROADCAST, user_of, user_stream
from ...core.tasks import cancel_and_wait
from ..base import Published, frame_parts
from . import scripts
from .cluster import ClusterPipelines
from .pipeline import AutoPipeline, Lua
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


def published(reply: Any, checked: bool) -> Published:
    """The script's reply: the id, whether a duplicate, sockets or members online (-1: not counted);
    `checked`: a check went with it (it is scheduled unless the publish was a duplicate)."""
    id_, duplicate, online = reply
    counted = None if online < 0 else int(online)
    return Published(id_, id_key(id_)[0], counted, duplicate=bool(duplicate), checked=checked and not duplicate)


class PublishScript:
    """The publish script and its checked variant, run by their SHA on the shared pipeline, and by
    their text (EVAL, which loads them again) when Redis lost them (a restart, a SCRIPT FLUSH)."""

    def __init__(self, pipeline: AutoPipeline | ClusterPipelines) -> None:
        self._pipeline = pipeline
        # Each command encoded once around what changes per call: 17 parts, EVALSHA (or EVAL), the
        # script, the key count, 5 keys and 9 arguments; checked, 25: 2 keys and 6 arguments more.
        self.plain = Lua.of(scripts.PUBLISH).heads(17, 5)
        self.checked = Lua.of(scripts.PUBLISH_CHECKED).heads(25, 7)
        self._retrying: set[asyncio.Task[None]] = set()  # `send`s that Redis ran no script for

    async def run(self, head: dict[str, bytes], body: bytes, key: str) -> Any:
        """The reply of `head` + `body` (`key`: the stream's, for a cluster's routing). Acknowledged:
        with NOTIFY_REDIS_REPLICAS_ACK, not before that many replicas confirm it (WAIT)."""
        try:
            return await self._pipeline.execute(head["EVALSHA"] + body, acknowledged=True, key=key)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self._pipeline.execute(head["EVAL"] + body, acknowledged=True, key=key)

    def send(self, body: bytes, key: str, then: Callable[[Any, BaseException | None], None]) -> bool:
        """`run` of the plain script with no coroutine, on one Redis (`AutoPipeline.send`): `then`
        gets the reply or the failure, once. False: nothing was sent, `run` is the way (as always in
        a cluster, whose pipelines route each command by its slot)."""
        if not isinstance(self._pipeline, AutoPipeline):
            return False

        def replied(reply: Any, failure: BaseException | None) -> None:
            if isinstance(failure, ResponseError) and str(failure).startswith("NOSCRIPT"):
                self._run_later(body, key, then)
            else:
                then(reply, failure)

        return self._pipeline.send(self.plain["EVALSHA"] + body, replied)

    def _run_later(self, body: bytes, key: str, then: Callable[[Any, BaseException | None], None]) -> None:
        async def again() -> None:
            try:
                reply = await self.run(self.plain, body, key)
            except Exception as exc:  # noqa: BLE001 - the caller hears of every failure, as from `send`
                then(None, exc)
            else:
                then(reply, None)

        task = asyncio.get_running_loop().create_task(again())
        self._retrying.add(task)
        task.add_done_callback(self._retrying.discard)

    async def aclose(self) -> None:
        await cancel_and_wait(self._retrying)
