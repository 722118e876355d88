"""Exposure: the limits a replica facing clients directly puts on its connections.

The server's HTTP protocol (`server/guardedhttp.py`) applies the header timeout and the largest request
head, and asks here, once per connection, whether the first request may be served: a replica past
NOTIFY_MAX_CONNECTIONS answers 503, an address past NOTIFY_MAX_CONNECTIONS_PER_IP answers 429.
Both are decided at the first request, not at accept: only a request can be answered, and a
connection that never sends one is closed by the header timeout anyway. A connection once
admitted is never refused later, so open sockets and the keep-alive connections of publishers
keep working whatever arrives after them.

It also paces WebSocket (`/ws`) and SSE (`/events`) handshakes to NOTIFY_MAX_HANDSHAKE_RATE a
second, before any token is read. A handshake costs a replica about as much CPU as delivering a
few hundred notifications; when a replica dies its sockets all come back at once to the others,
which would otherwise spend every core on handshakes while their own sockets waited for their
notifications. A burst of up to a tenth of a second's worth goes through at once; beyond it each
handshake is held back until its turn (the connection waits, nothing is read from it), as long as
its turn is at most a second away; past that it is answered 429 with a jittered Retry-After.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import resource
import time
from collections.abc import Callable, Sized

from prometheus_client import Counter, Gauge
from uvicorn.middleware.proxy_headers import _TrustedHosts

from ..config.settings import Settings
from ..core.errors import OverCapacity, RateLimited, ServiceError, TooManyFromAddress
from ..telemetry.metrics import Metrics

logger = logging.getLogger("service")

# Descriptors kept out of the connection ceiling: the Redis pool (64) and the publish and
# subscription connections, a JWKS fetch, log files, the listener and the event loop's own.
RESERVED_FDS = 128
# Past the ceiling connections are still accepted, to be answered 503; this share of the
# descriptors left is kept for them, so that refusing never turns into failing to accept.
REFUSAL_HEADROOM = 0.1
# Raising the soft limit stops here even when the hard limit is unlimited.
FD_LIMIT_CAP = 1 << 20
# A refused client may retry this soon: sockets close all the time on a busy replica.
RETRY_AFTER_SECONDS = 1
# Served even past the ceilings: an orchestrator must still see the process alive, and an operator
# the refusals. /readyz is refused like anything else, which takes the replica out of rotation.
EXEMPT_PATHS = frozenset({"/healthz", "/metrics"})
# A request head (request line and headers) larger than this is answered 431.
MAX_HEAD_BYTES = 64 * 1024
# The requests NOTIFY_MAX_HANDSHAKE_RATE counts: a client socket's handshake, an event stream's request.
HANDSHAKE_PATHS = frozenset({"/ws", "/events"})
# Handshakes taken on at once, beyond the rate, in seconds' worth of it; and the longest a handshake
# is held back for its turn before it is refused instead.
HANDSHAKE_BURST_SECONDS = 0.1
HANDSHAKE_QUEUE_SECONDS = 1.0
# WebSocket handshakes between their turn and the app's answer (accept, refusal), at most, with the
# rate capped or not: each reads the socket's history through the Redis pool (64 connections), and a
# burst (every pending connection is accepted at once, and timers fall due together behind a pause
# of the loop) must not take every connection of it at once.
MAX_HANDSHAKES_IN_FLIGHT = 32
# A handshake refused at the rate is told to come back within [1, N] seconds, N growing with how
# far over the rate the last second's handshakes were (so retries spread at about the rate), up to this.
HANDSHAKE_RETRY_SPREAD_MAX = 30


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as far as FD_LIMIT_CAP; the soft limit after.

    A socket server is bounded by its descriptors, and the usual soft default (1,024) is a limit
    nobody chose for it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            logger.warning("could not raise the file-descriptor limit from %d to %d", soft, target)
    return FD_LIMIT_CAP if soft == resource.RLIM_INFINITY else soft


def default_max_connections(fd_limit: int) -> int:
    """The connection ceiling a descriptor limit allows, with room for Redis, logs and refusals."""
    return max(1, fd_limit // 2, int((fd_limit - RESERVED_FDS) * (1 - REFUSAL_HEADROOM)))


class HandshakeRateExceeded(RateLimited):
    """A handshake beyond NOTIFY_MAX_HANDSHAKE_RATE: 429 `too_many_handshakes`, with a Retry-After
    drawn at random so that the refused do not all come back together.

    429, not 503: a proxy that retries 503s on another replica (deploy/nginx.conf, for draining
    replicas) also counts each 503 as a failure of the replica that sent it, and takes it out of
    rotation after two (`max_fails=2`). In a reconnect storm every surviving replica refuses
    handshakes, so a 503 would take every one of them out, publishes included: measured, 4 s of
    502 for everything (docs/reliability.md, "Reconnect storm"). A 429 is passed to the client as it is."""

    code = "too_many_handshakes"


class Exposure:
    """Connection ceilings and the header timeout, shared by every connection of one server."""

    def __init__(self, settings: Settings, fd_limit: int) -> None:
        self.header_timeout = settings.header_timeout_seconds
        self.max_connections = settings.max_connections or default_max_connections(fd_limit)
        self.max_per_ip = settings.max_connections_per_ip
        self._trusted: _TrustedHosts | None = None
        self._per_ip: dict[str, int] = {}
        self._capped_ips: set[str] = set()
        self._full = False
        self._refused_while_full = 0
        self._refused: Counter | None = None
        self.header_timeouts: Counter | None = None
        # The handshake rate, as a virtual schedule (GCRA): the time at which the next handshake
        # is due if they keep coming at the rate.
        self.handshake_rate = settings.max_handshake_rate
        self._handshake_due = 0.0
        self._handshakes_delayed: Counter | None = None
        self._handshakes_capped = False
        self._in_flight = 0  # WebSocket handshakes begun and not yet answered
        self._in_flight_peak = 0  # the most at once since start
        self._next_in_flight: collections.deque[Callable[[], None]] = collections.deque()
        self._handshakes_refused_run = 0  # refused since the rate was last reached
        self._handshake_window = (0.0, 0, 0)  # (start, refused in it, refused in the one before)

    def log_limits(self, fd_limit: int) -> None:
        rate = f"{self.handshake_rate:g}/s" if self.handshake_rate is not None else "no cap"
        logger.info(
            "serving up to %d connections (file-descriptor limit %d); request heads due within %gs; "
            "socket and stream handshakes: %s",
            self.max_connections,
            fd_limit,
            self.header_timeout,
            rate,
        )
        if self.max_connections > fd_limit - RESERVED_FDS:
            logger.warning(
                "NOTIFY_MAX_CONNECTIONS=%d is more than the file-descriptor limit (%d) allows: accepting will "
                "fail before the ceiling is reached",
                self.max_connections,
                fd_limit,
            )

    def trust(self, forwarded_allow_ips: list[str] | str) -> None:
        """Peers whose X-Forwarded-For names the client: uvicorn's FORWARDED_ALLOW_IPS, read the way
        uvicorn's proxy-headers middleware reads it, so the count and the logs agree on who called."""
        self._trusted = _TrustedHosts(forwarded_allow_ips)

    def bind(self, metrics: Metrics, connections: Sized) -> None:
        """Export the figures on the app's registry, once the app's lifespan has made it."""
        registry = metrics.registry
        self._refused = Counter(
            "notify_connections_refused",
            "Requests and handshakes refused at a connection ceiling, by ceiling.",
            ["reason"],
            registry=registry,
        )
        self.header_timeouts = Counter(
            "notify_header_timeouts",
            "Connections closed for not sending a complete request head in time: "
            "partial (answered 408) or silent (closed without a word).",
            ["kind"],
            registry=registry,
        )
        open_connections = Gauge(
            "notify_open_connections", "Open TCP connections: HTTP, WebSocket and SSE.", registry=registry
        )
        open_connections.set_function(lambda: len(connections))
        ceiling = Gauge("notify_max_connections", "The connection ceiling in effect.", registry=registry)
        ceiling.set(self.max_connections)
        rate = Gauge(
            "notify_max_handshake_rate",
            "WebSocket and SSE handshakes per second taken on (NOTIFY_MAX_HANDSHAKE_RATE; 0: no cap).",
            registry=registry,
        )
        rate.set(self.handshake_rate or 0)
        in_flight = Gauge(
            "notify_handshakes_in_flight",
            "WebSocket handshakes begun and not answered yet (at most 32).",
            registry=registry,
        )
        in_flight.set_function(lambda: self._in_flight)
        peak = Gauge(
            "notify_handshakes_in_flight_peak",
            "The most WebSocket handshakes in flight at once since start (at most 32).",
            registry=registry,
        )
        peak.set_function(lambda: self._in_flight_peak)
        self._handshakes_delayed = Counter(
            "notify_handshakes_delayed",
            "WebSocket and SSE handshakes held back for their turn under NOTIFY_MAX_HANDSHAKE_RATE.",
            registry=registry,
        )

    def client_of(self, peer: str | None, forwarded_for: bytes | None) -> str | None:
        """The address a connection is counted under."""
        if forwarded_for is not None and self._trusted is not None and peer in self._trusted:
            host, _ = self._trusted.get_trusted_client_address(forwarded_for.decode("latin-1"))
            return host or peer
        return peer

    def admit(self, open_connections: int, client: str | None) -> ServiceError | None:
        """None: serve the first request of a new connection (counted under `client` until
        `release`); otherwise the refusal to answer it with. The caller reports a refusal it
        answered with `refused`."""
        if open_connections > self.max_connections:
            return OverCapacity(
                f"this replica is at its ceiling of {self.max_connections} connections: retry shortly",
                RETRY_AFTER_SECONDS,
            )
        if self._full:
            self._full = False
            logger.warning(
                "below the connection ceiling again (%d open of %d); %d requests were refused meanwhile",
                open_connections,
                self.max_connections,
                self._refused_while_full,
            )
        if self.max_per_ip is not None and client is not None:
            held = self._per_ip.get(client, 0)
            if held >= self.max_per_ip:
                return TooManyFromAddress(
                    f"{client} already has {held} connections open, the most allowed per address",
                    RETRY_AFTER_SECONDS,
                )
            self._per_ip[client] = held + 1
        return None

    def handshake(self) -> float | ServiceError:
        """How long to hold a WebSocket or SSE handshake back before taking it on (0: now), or the
        429 to answer it with (the caller reports it with `refused`)."""
        rate = self.handshake_rate
        if rate is None:
            return 0.0
        now = time.monotonic()
        due = max(self._handshake_due, now)
        wait = max(0.0, due - HANDSHAKE_BURST_SECONDS - now)
        if wait <= HANDSHAKE_QUEUE_SECONDS:
            self._handshake_due = due + 1 / rate
            if wait:
                if self._handshakes_delayed is not None:
                    self._handshakes_delayed.inc()
            elif self._handshakes_capped:
                self._handshakes_capped = False
                logger.warning(
                    "handshakes are taken on at once again; %d were refused over NOTIFY_MAX_HANDSHAKE_RATE=%g/s "
                    "meanwhile",
                    self._handshakes_refused_run,
                    rate,
                )
            return wait
        start, current, previous = self._handshake_window
        if now - start >= 1.0:
            start, current, previous = now, 0, current if now - start < 2.0 else 0
        current += 1
        self._handshake_window = (start, current, previous)
        spread = min(HANDSHAKE_RETRY_SPREAD_MAX, 1 + math.ceil(max(current, previous) / rate))
        return HandshakeRateExceeded(
            f"this replica takes on at most {rate:g} socket and stream handshakes a second: retry shortly",
            random.randint(1, spread),
        )

    def begin_handshake(self, start: Callable[[], None]) -> None:
        """Run `start` (a WebSocket handshake's turn) now if fewer than MAX_HANDSHAKES_IN_FLIGHT are
        in flight, else once one of them ends; every start is followed by one `end_handshake`."""
        if self._in_flight < MAX_HANDSHAKES_IN_FLIGHT:
            self._in_flight += 1
            self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
            start()
        else:
            self._next_in_flight.append(start)

    def end_handshake(self) -> None:
        self._in_flight -= 1
        if self._next_in_flight and self._in_flight < MAX_HANDSHAKES_IN_FLIGHT:
            self._in_flight += 1
            asyncio.get_running_loop().call_soon(self._next_in_flight.popleft())

    def refused(self, refusal: ServiceError, client: str | None) -> None:
        """Count a refusal; say once, not once per refusal, that a ceiling was reached."""
        if isinstance(refusal, HandshakeRateExceeded):
            reason = "max_handshake_rate"
            self._handshakes_refused_run += 1
            if not self._handshakes_capped:
                self._handshakes_capped = True
                self._handshakes_refused_run = 1
                logger.warning(
                    "handshakes over NOTIFY_MAX_HANDSHAKE_RATE=%g/s for more than a second ahead: new sockets and "
                    "streams get 429 with Retry-After until they slow down (open sockets are not affected)",
                    self.handshake_rate,
                )
        elif isinstance(refusal, OverCapacity):
            reason = "max_connections"
            self._refused_while_full += 1
            if not self._full:
                self._full = True
                self._refused_while_full = 1
                logger.warning(
                    "connection ceiling reached: NOTIFY_MAX_CONNECTIONS=%d; new requests and handshakes get 503 "
                    "until connections close (open sockets are not affected)",
                    self.max_connections,
                )
        else:
            reason = "max_connections_per_ip"
            if client is not None and client not in self._capped_ips:
                self._capped_ips.add(client)
                logger.warning(
                    "%s reached NOTIFY_MAX_CONNECTIONS_PER_IP=%d; its new connections get 429", client, self.max_per_ip
                )
        if self._refused is not None:
            self._refused.labels(reason).inc()

    def release(self, client: str) -> None:
        """The admitted connection counted under `client` has closed."""
        held = self._per_ip.get(client, 0) - 1
        if held > 0:
            self._per_ip[client] = held
        else:
            self._per_ip.pop(client, None)
        if self.max_per_ip is not None and held < self.max_per_ip:
            self._capped_ips.discard(client)

    def releaser(self, client: str) -> Callable[[], None]:
        return lambda: self.release(client)

    def timed_out(self, partial: bool) -> None:
        if self.header_timeouts is not None:
            self.header_timeouts.labels("partial" if partial else "silent").inc()
