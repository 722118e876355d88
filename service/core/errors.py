"""Errors the service raises on purpose, each mapped to one HTTP status in `api/app.py`.

ServiceError
├── InvalidToken        401  no token, bad signature, expired, wrong audience/issuer, no `sub`
├── MissingScope        403  a valid token without the scope the route needs
├── NotFound            404
├── InvalidRequest      422  a body or parameter that breaks the contract
├── PayloadTooLarge     413  body over NOTIFY_MAX_PAYLOAD_BYTES
├── RateLimited         429  publisher over NOTIFY_PUBLISH_RATE (carries retry_after)
│   ├── TooManyFromAddress  429  this address over NOTIFY_MAX_CONNECTIONS_PER_IP
│   └── TooManyForUser      429  this user over NOTIFY_MAX_CONNECTIONS_PER_USER on this replica
├── NamespaceFull       429  a publish to one more topic than the namespace's `max_topics` may hold
├── BrokerUnavailable   503  Redis unreachable, hung or not subscribed yet
│   answered by the server's protocols, before any routing (`server/guardedhttp.py`, `server/wsprotocol.py`):
├── MalformedRequest    400  not HTTP the parser accepts
├── RequestTimeout      408  no complete request head within NOTIFY_HEADER_TIMEOUT_SECONDS
├── HeadersTooLarge     431  a request head, or one line of a WebSocket handshake, too large
└── OverCapacity        503  the replica at NOTIFY_MAX_CONNECTIONS (carries retry_after)
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error with a status and a message meant for the caller."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for."""
        return {}

    def body(self) -> dict[str, str]:
        """The JSON body of the answer: what went wrong, for a program and for a person."""
        return {"error": self.code, "message": self.message}


class InvalidToken(ServiceError):
    status_code = 401
    code = "invalid_token"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class MissingScope(ServiceError):
    status_code = 403
    code = "missing_scope"


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class InvalidRequest(ServiceError):
    status_code = 422
    code = "invalid_request"


class RateLimited(ServiceError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class NamespaceFull(ServiceError):
    """Raised by the brokers: the topic's namespace already has `max_topics` topics holding history,
    and this one is not among them (nothing was published)."""

    status_code = 429
    code = "namespace_full"

    def __init__(self, namespace: str, limit: int) -> None:
        super().__init__(
            f"namespace {namespace!r} already has its {limit} topics holding history;"
            " publish to one of them, or wait until one's history expires"
        )


class BrokerUnavailable(ServiceError):
    status_code = 503
    code = "broker_unavailable"


class TooManyFromAddress(RateLimited):
    code = "too_many_connections"


class TooManyForUser(ServiceError):
    """Raised by the hub when a user already holds NOTIFY_MAX_CONNECTIONS_PER_USER on this replica
    (a socket is closed with 4029, an SSE stream answered 429)."""

    status_code = 429
    code = "too_many_connections"


class OverCapacity(ServiceError):
    status_code = 503
    code = "over_capacity"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class MalformedRequest(ServiceError):
    status_code = 400
    code = "malformed_request"


class RequestTimeout(ServiceError):
    status_code = 408
    code = "request_timeout"


class HeadersTooLarge(ServiceError):
    status_code = 431
    code = "headers_too_large"
