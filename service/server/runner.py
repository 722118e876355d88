"""The uvicorn server, pinned to the service's limits, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from types import FrameType

import uvicorn
from fastapi import FastAPI
from prometheus_client import Gauge

from ..api.app import create_app
from ..api.runtime import Runtime
from ..config.settings import Settings
from ..core.frames import CloseCode
from ..telemetry.logs import log_config
from .acceptor import Acceptor
from .admission import Exposure, raise_fd_limit
from .gcpacer import paced_collections
from .httpprotocol import PublishingHttpProtocol
from .wsprotocol import BoundedWebSocketProtocol

logger = logging.getLogger("service")

# After the drain, uvicorn gets this long for in-flight requests before it cuts them.
GRACEFUL_SHUTDOWN_SECONDS = 3
# Between closing the listening socket and shutting down the connections.
LISTENER_CLOSE_SECONDS = 0.3


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: refuse new sockets, close open ones with 1012 spread over the
    drain time, then let uvicorn finish in-flight requests and stop. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_seconds: float, exposure: Exposure) -> None:
        super().__init__(config)
        self._app = app
        self._drain_seconds = drain_seconds
        self._exposure = exposure
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self._loop = asyncio.get_running_loop()
        unsupported = unsupported_options(self.config)
        if sockets is None and unsupported:
            # The listening socket is ours (acceptor.py), on --host and --port: refused, not ignored.
            logger.error("not supported: uvicorn's %s option; the replica listens on host and port only", unsupported)
            raise SystemExit(3)
        await super().serve(sockets)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        if sockets is not None:
            await super().startup(sockets)
        else:
            # uvicorn starts the app and makes no server for an empty list of sockets; the listening
            # socket is ours (acceptor.py), made the way uvicorn makes its protocols.
            await super().startup([])
            config, state = self.config, self.server_state

            def create_protocol() -> asyncio.Protocol:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config, server_state=state, app_state=self.lifespan.state
                )

            try:
                acceptor = Acceptor.bind(config.host, config.port, config.backlog, create_protocol, self._starved)
            except OSError as exc:
                logger.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
                await self.lifespan.shutdown()
                raise SystemExit(3) from None
            self.servers = [acceptor]  # type: ignore[list-item]
            self._log_started_message(acceptor.sockets)
        runtime: Runtime | None = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            # Leaks show here first: every socket, request and background job is a task.
            loop = asyncio.get_running_loop()
            registry = runtime.metrics.registry
            tasks = Gauge("notify_event_loop_tasks", "Tasks alive on the event loop.", registry=registry)
            tasks.set_function(lambda: len(asyncio.all_tasks(loop)))
            self._exposure.bind(runtime.metrics, self.server_state.connections)

    def _starved(self) -> None:
        """Accepting paused for lack of descriptors: counted on /metrics."""
        runtime: Runtime | None = getattr(self._app.state, "runtime", None)
        if runtime is not None:
            runtime.metrics.accept_paused.inc()

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


def unsupported_options(config: uvicorn.Config) -> str:
    """uvicorn's listening options that the acceptor does not honour, by name ("" if none is set)."""
    chosen = {"ssl": config.is_ssl, "uds": config.uds is not None, "fd": config.fd is not None}
    return ", ".join(name for name, on in chosen.items() if on)


def build_server(settings: Settings, host: str, port: int) -> DrainingServer:
    app = create_app(settings, [lambda runtime: paced_collections(runtime.hub)])
    fd_limit = raise_fd_limit()
    exposure = Exposure(settings, fd_limit)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        # Said, not guessed from the app: its __call__ hands back a coroutine rather than being one.
        interface="asgi3",
        http=functools.partial(PublishingHttpProtocol, exposure=exposure),  # type: ignore[arg-type]
        ws=BoundedWebSocketProtocol,
        # Clients send only small control frames: a bigger one is closed with 1009 before it is buffered.
        ws_max_size=settings.max_inbound_bytes,
        ws_max_queue=4,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_timeout,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=settings.keep_alive_seconds,  # type: ignore[arg-type]
        log_config=log_config(settings.log_level, settings.log_json),
        access_log=False,
        server_header=False,
    )
    # The addresses uvicorn takes X-Forwarded-For from, read by uvicorn (FORWARDED_ALLOW_IPS).
    exposure.trust(config.forwarded_allow_ips)
    exposure.log_limits(fd_limit)  # after uvicorn.Config, which sets logging up
    return DrainingServer(config, app, settings.drain_seconds, exposure)
