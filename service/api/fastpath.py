"""The publish fast path: what a well-formed publish needs, decided without the framework.

`POST /notify/{user}`, `POST /broadcast` and `POST /topics/{topic}` are the hot path of every backend. The HTTP protocol
(`service/server/httpprotocol.py`) asks `publish_target` once the request line and headers are in (a POST), and
`prepare` once the body is: a request with a valid token and a valid body within the size limit is
published with the same models and the same `_publish` as the routes, and answered by `answer`.
Anything else (no or bad token, a bad or oversized body, a bad id, a browser's Origin,
a JWKS key still to fetch) goes on to the framework and its route, which answer it with the usual
error. Only errors of the publish itself are answered here, since retrying it on the slow path
would double its deadline.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from ..auth.tokens import PUBLISH_SCOPE, Principal
from ..broker import Published
from ..core.errors import BrokerUnavailable, InvalidToken, ServiceError
from ..core.ids import is_valid_user_id
from ..core.streams import BROADCAST, is_topic, topic_stream, user_of, user_stream
from ..core.topics import is_valid_topic_name
from .models import NotifyRequest, PlainPublish, PublishRequest
from .publish import _publish, accepted, check_rate, count_published, encoded_data, scoped_idempotency_key
from .runtime import Runtime

Header = tuple[bytes, bytes]

# What `publish_target` answers for any other path (no stream's name is empty).
NOT_A_PUBLISH = ""


@dataclass(slots=True)
class FastPublish:
    """A publish that passed every check the route would make."""

    principal: Principal
    stream: str
    request: PublishRequest | PlainPublish
    idempotency_key: str | None
    token: bytes  # as the Authorization header gave it, after "Bearer "
    checked: bool = False  # counted and held to the publish rate already (`answer_soon`)


# A connection's last publisher token and its principal: a backend's keep-alive connection sends the
# same token with every publish, and comparing it with the last one (in constant time) costs less
# than finding it in the verifier's cache, which hashes it first.
Known = tuple[bytes, Principal]


def publish_target(path: str) -> str:
    """The stream a POST to this path publishes to, or NOT_A_PUBLISH."""
    if path == "/broadcast":
        return BROADCAST
    if path.startswith("/notify/") and is_valid_user_id(path[8:]):
        return user_stream(path[8:])
    if path.startswith("/topics/") and is_valid_topic_name(path[8:]):
        return topic_stream(path[8:])
    return NOT_A_PUBLISH


def prepare(
    runtime: Runtime, stream: str, headers: list[Header], body: bytes, known: Known | None = None
) -> FastPublish | None:
    """The checked publish, or None: the framework answers this request (see the module docstring).
    The caller has held `body` to NOTIFY_MAX_PAYLOAD_BYTES; `known` is the last publish's token on
    this connection and its principal."""
    authorization = idempotency_key = None
    for name, value in headers:
        if name == b"authorization":
            authorization = value
        elif name == b"idempotency-key":
            idempotency_key = value
        elif name == b"origin" or (name == b"content-type" and not value.startswith(b"application/json")):
            return None  # browsers get CORS headers and odd bodies their 422: the full route
    if authorization is None or not authorization.startswith(b"Bearer "):
        return None
    if is_topic(stream) and not runtime.topics.exists(stream[2:]):
        return None  # the route answers 404
    key = idempotency_key.decode("latin-1") if idempotency_key is not None else None
    if key is not None and not 0 < len(key) <= 256:
        return None
    if b"NaN" in body or b"Infinity" in body:
        return None  # pydantic would read these literals here; the route's parser refuses them (`api.body`)
    token = authorization[7:]
    try:
        if known is not None and hmac.compare_digest(known[0], token) and known[1].expires_at > time.time():
            principal: Principal | None = known[1]
        else:
            principal = runtime.verifier.verify_now(token.decode("latin-1").strip())
        # A user's notification may carry a fallback; a broadcast or a topic's message may not.
        request = plain(body)
        if request is None:
            request = (NotifyRequest if user_of(stream) is not None else PublishRequest).model_validate_json(body)
    except (InvalidToken, ValidationError):
        return None
    if principal is None or PUBLISH_SCOPE not in principal.scopes:
        return None
    return FastPublish(principal, stream, request, key, token)


# What `plain` leaves to the model: a run of digits that may be an integer past 64 bits (orjson reads
# one as a float, the model refuses it), and more brackets than the model's nesting limit (200)
# while orjson's is 1,024. Either may be a false alarm (digits in a string): the model then reads it.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")
_MAX_BRACKETS = 200
_PLAIN_KEYS = frozenset(("event", "data"))


def plain(body: bytes) -> PlainPublish | None:
    """The common body, an event name and optional data, read with orjson where it is certain that
    the model would read the same; None for any other body, which the model reads (and refuses with
    its usual errors). The model's rules for `event`: a string of 1 to 128 characters and no control
    character (a printable string has none; a string that is not printable is left to the model)."""
    if _LONG_DIGITS.search(body) is not None or body.count(b"[") + body.count(b"{") > _MAX_BRACKETS:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict or not value.keys() <= _PLAIN_KEYS:
        return None
    event = value.get("event")
    if type(event) is not str or not 0 < len(event) <= 128 or not event.isprintable():
        return None
    return PlainPublish(event, value.get("data"))


async def answer(runtime: Runtime, fast: FastPublish) -> tuple[int, bytes, list[Header]]:
    """Publish, and the response: status, JSON body and extra headers."""
    try:
        if not fast.checked:
            runtime.metrics.publish_fast_path.inc()
            check_rate(runtime, fast.principal)
        published = await _publish(runtime, fast.principal, fast.stream, fast.request, fast.idempotency_key)
    except ServiceError as exc:
        return _failed(runtime, exc)
    return 202, orjson.dumps(accepted(fast.stream, published)), []


# What `answer_soon` hands its answer to: status, JSON body, extra headers, and the notification's id
# (for the access line) once it has one.
Reply = Callable[[int, bytes, list[Header], str | None], None]


def answer_soon(runtime: Runtime, fast: FastPublish, reply: Reply) -> bool:
    """`answer` with no task or coroutine, for the common publish (`plain`: no push, no fallback) to a
    user or to everyone, where the broker can send it at once (`Broker.publish_soon`): `reply` gets
    the answer once, when the broker's reply is read (or at once, for an error or the embedded broker).
    False: `answer` is the way; the publish may have been counted and its rate checked then (`checked`)."""
    request, stream = fast.request, fast.stream
    if type(request) is not PlainPublish or is_topic(stream):
        return False
    fast.checked = True
    runtime.metrics.publish_fast_path.inc()
    try:
        check_rate(runtime, fast.principal)
        data_json = encoded_data(runtime, request)
    except ServiceError as exc:
        reply(*_failed(runtime, exc), None)
        return True
    started = time.perf_counter()

    def published(outcome: Published | BrokerUnavailable) -> None:
        if isinstance(outcome, BrokerUnavailable):
            reply(*_failed(runtime, outcome), None)
            return
        count_published(runtime, stream, outcome, started)
        reply(202, orjson.dumps(accepted(stream, outcome)), [], outcome.id)

    return runtime.broker.publish_soon(
        stream,
        orjson.dumps(request.event).decode(),
        data_json,
        scoped_idempotency_key(fast.principal, fast.idempotency_key),
        published,
    )


def _failed(runtime: Runtime, exc: ServiceError) -> tuple[int, bytes, list[Header]]:
    runtime.metrics.errors.labels(exc.code).inc()
    return error_answer(exc)


def error_answer(exc: ServiceError) -> tuple[int, bytes, list[Header]]:
    """An error's status, JSON body and extra headers, as the app's error handler gives them."""
    headers = [(name.lower().encode(), value.encode()) for name, value in exc.headers().items()]
    return exc.status_code, orjson.dumps(exc.body()), headers
