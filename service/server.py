"""The uvicorn server, pinned to the service's limits, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import random
from types import FrameType

import uvicorn
from fastapi import FastAPI
from prometheus_client import Gauge
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from .app import create_app
from .frames import SEND_FRAME_EXTENSION, CloseCode
from .logs import log_config
from .runtime import Runtime
from .settings import Settings

logger = logging.getLogger("service")

# After the drain, uvicorn gets this long for in-flight requests before it cuts them.
GRACEFUL_SHUTDOWN_SECONDS = 3
# Between closing the listening socket and shutting down the connections.
LISTENER_CLOSE_SECONDS = 0.3
# A peer gets this long to answer our close frame before its TCP connection is dropped.
WS_CLOSE_TIMEOUT_SECONDS = 3.0
# Once we close a socket, its last bytes get this long to leave; a peer that reads nothing is aborted.
CLOSE_GRACE_SECONDS = 2.0


class _AbortingTransport:
    """The real transport, except that `close()` becomes `abort()` when the peer has not taken
    the last bytes within a grace period: a peer that reads nothing never lets a close complete,
    and would hold its socket, buffers and task until the kernel gave up minutes later."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._abort_timer: asyncio.TimerHandle | None = None
        self.lost = False

    def close(self) -> None:
        self._transport.close()
        if self._abort_timer is None and not self.lost:
            self._abort_timer = self._loop.call_later(CLOSE_GRACE_SECONDS, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.lost:
            self._transport.abort()

    def connection_lost(self) -> None:
        self.lost = True
        if self._abort_timer is not None:
            self._abort_timer.cancel()

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, bounded against peers that stop reading.

    - The app's close is never held back by a full send buffer: the close frame is queued behind
      what is already buffered, the app is told the socket is gone, and the TCP connection is
      aborted if the peer has not completed the close after WS_CLOSE_TIMEOUT_SECONDS + grace.
    - Every other close (ping timeout, shutdown) likewise ends in an abort after the grace period.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.close_timeout = WS_CLOSE_TIMEOUT_SECONDS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_AbortingTransport(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.transport, _AbortingTransport):
            self.transport.connection_lost()
        super().connection_lost(exc)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The app task has not started yet: offer it the direct write (see `send_frame`).
        if getattr(self, "scope", None) is not None:
            self.scope["extensions"][SEND_FRAME_EXTENSION] = self.send_frame

    def send_frame(self, wire: bytes) -> bool:
        """Write an already-encoded text frame now, if the socket is open and its buffer has room.

        False means: use the ordinary ASGI send, which waits for room or reports the socket gone."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
        ):
            return False
        self.transport.write(wire)
        return True

    async def send(self, message: dict) -> None:  # type: ignore[override,type-arg]
        if (
            message["type"] == "websocket.close"
            and self.handshake_complete
            and not self.close_sent
            and not self.disconnected
            and not self.writable.is_set()
        ):
            # The peer is not reading: waiting for room in the buffer to say goodbye would wait forever.
            self.writable.set()
        await super().send(message)  # type: ignore[arg-type]


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: refuse new sockets, close open ones with 1012 spread over the
    drain time, then let uvicorn finish in-flight requests and stop. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        runtime: Runtime | None = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            # Leaks show here first: every socket, request and background job is a task.
            loop = asyncio.get_running_loop()
            registry = runtime.metrics.registry
            tasks = Gauge("notify_event_loop_tasks", "Tasks alive on the event loop.", registry=registry)
            tasks.set_function(lambda: len(asyncio.all_tasks(loop)))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: Runtime | None = getattr(self._app.state, "runtime", None)
        if runtime is None or self._loop is None or self.should_exit or runtime.draining:
            super().handle_exit(sig, frame)  # not serving yet, or a second signal: stop now
            return
        # Set here, in the signal handler, so that no request handled after the signal (not even
        # one whose bytes arrived in the same loop iteration) still sees the replica as ready.
        runtime.draining = True
        self._loop.call_soon_threadsafe(self._start_drain, runtime)

    def _start_drain(self, runtime: Runtime) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(runtime))

    async def _drain(self, runtime: Runtime) -> None:
        conns = list(runtime.hub.connections)
        logger.info("draining %d connections over %gs", len(conns), self._drain_seconds)
        random.shuffle(conns)
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Socket i of n closes at drain * i / n: evenly spread, on a schedule that sleeps cannot stretch.
        for i, conn in enumerate(conns):
            delay = started + self._drain_seconds * i / len(conns) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            conn.close(CloseCode.SERVICE_RESTART, "service restart: reconnect with since")
        # Closing handshakes get a moment; a peer that never answers is cut by the protocol.
        for _ in range(20):
            if not len(runtime.hub):
                break
            await asyncio.sleep(0.05)
        # Stop listening first, and give connections accepted a moment ago the time to be read: a
        # request already sent is served, not cut by uvicorn's shutdown of connections it sees idle.
        for server in self.servers:
            server.close()
        await asyncio.sleep(LISTENER_CLOSE_SECONDS)
        # Not `handle_exit`: uvicorn would re-raise the signal once stopped, and the process would die
        # of SIGTERM instead of exiting 0 after a clean drain.
        self.should_exit = True


def build_server(settings: Settings, host: str, port: int) -> DrainingServer:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws=BoundedWebSocketProtocol,
        # Clients send only small control frames: a bigger one is closed with 1009 before it is buffered.
        ws_max_size=settings.max_inbound_bytes,
        ws_max_queue=4,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        log_config=log_config(settings.log_level, settings.log_json),
        access_log=False,
        server_header=False,
    )
    return DrainingServer(config, app, settings.drain_seconds)
