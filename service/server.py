"""The uvicorn server, pinned to the service's limits, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import random
from types import FrameType

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .frames import CloseCode
from .logs import log_config
from .runtime import Runtime
from .settings import Settings

logger = logging.getLogger("service")

# After the drain, uvicorn gets this long for in-flight requests before it cuts them.
GRACEFUL_SHUTDOWN_SECONDS = 3


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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: Runtime | None = getattr(self._app.state, "runtime", None)
        if self._drain_task is not None or runtime is None or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._start_drain, runtime, sig)

    def _start_drain(self, runtime: Runtime, sig: int) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(runtime, sig))

    async def _drain(self, runtime: Runtime, sig: int) -> None:
        runtime.draining = True
        conns = list(runtime.hub.connections)
        logger.info("draining %d connections over %gs", len(conns), self._drain_seconds)
        random.shuffle(conns)
        step = self._drain_seconds / len(conns) if conns else 0.0
        for conn in conns:
            conn.close(CloseCode.SERVICE_RESTART, "service restart: reconnect with since")
            if step:
                await asyncio.sleep(step)
        # Closing handshakes get a moment; a peer that never answers is cut by uvicorn.
        for _ in range(20):
            if not len(runtime.hub):
                break
            await asyncio.sleep(0.05)
        super().handle_exit(sig, None)


def build_server(settings: Settings, host: str, port: int) -> DrainingServer:
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
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
