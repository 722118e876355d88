"""create_app(settings): the FastAPI app; its lifespan owns the broker, hub and metrics."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from .. import __version__
from ..auth.tokens import TokenVerifier
from ..broker import Broker, create_broker
from ..config.settings import Settings
from ..core.errors import ServiceError
from ..core.ratelimit import KeyedRate
from ..core.streams import user_stream
from ..core.topics import Topics
from ..delivery.hub import Hub
from ..delivery.memberlists import MemberLists
from ..outbox import create_outbox
from ..outbox.checks import Checks
from ..push import Push, create_push
from ..push import jobs as push_jobs
from ..push.jobs import PushJobs
from ..telemetry import logs
from ..telemetry.logs import AccessLog
from ..telemetry.metrics import Metrics
from ..webhooks import PresenceEvents, ReadMarkers, Webhooks
from ..webhooks.fallback import checks_for, fallbacks_for, wanted
from . import client_assets, devices, events, health, inbox, publish, topics, webhooks, ws
from .hooks import Hooks
from .limits import RequestLimits
from .membership import MEMBERS_SHOWN
from .models import ErrorBody
from .runtime import Runtime

logger = logging.getLogger("service")

DESCRIPTION = """User-targeted real-time notifications.

Backends publish with `POST /notify/{user_id}` and `POST /broadcast` (scope `notify:publish`);
clients receive on `GET /ws` (WebSocket) or `GET /events` (Server-Sent Events) with their JWT.
The socket protocol is described in `openapi/asyncapi.yaml`."""

# What any request may be answered before it reaches a route (`server/guardedhttp.py`, `server/admission.py`).
CONNECTION_ERRORS: dict[int | str, dict[str, Any]] = {
    408: {"model": ErrorBody, "description": "No complete request head within NOTIFY_HEADER_TIMEOUT_SECONDS."},
    429: {
        "model": ErrorBody,
        "description": "Over NOTIFY_MAX_CONNECTIONS_PER_IP for the caller's address; see Retry-After.",
    },
    431: {"model": ErrorBody, "description": "A request head over 64 KB."},
    503: {"model": ErrorBody, "description": "The replica is at NOTIFY_MAX_CONNECTIONS; see Retry-After."},
}


class NotifyApp(FastAPI):
    """FastAPI, except that client sockets skip its layers and go straight to their handler
    (`api.ws.serve_socket`), and every HTTP request passes the access log first: its request id,
    and its line as NOTIFY_ACCESS_LOG says. (Under the service's own server, a well-formed publish
    never reaches the app: see `server/httpprotocol.py`.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http: ASGIApp = AccessLog(super().__call__)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:  # type: ignore[override]
        # Not a coroutine itself: it hands back the handler's own, so that no frame of this
        # dispatch stays suspended under every open socket. (The server is told this is ASGI 3.)
        if scope["type"] == "http":
            return self._http(scope, receive, send)
        if scope["type"] == "websocket" and scope["path"] == ws.PATH:
            return ws.serve_socket(scope, receive, send)
        return super().__call__(scope, receive, send)


# Something the process runs beside the app for as long as its lifespan lasts (the server's GC pacer):
# the api layer owns the lifespan, the server layer what a process needs around it.
ProcessHook = Callable[[Runtime], AbstractAsyncContextManager[object]]


def create_app(settings: Settings, process_hooks: Sequence[ProcessHook] = ()) -> FastAPI:
    """Build the app; nothing is connected until its lifespan starts."""
    logs.configure_access_log(
        settings.access_log, settings.access_log_slow_seconds, settings.access_log_summary_seconds
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        replica_id = uuid.uuid4().hex[:12]
        metrics = Metrics(replica_id)
        topics = Topics(settings.topics, settings.presence_leave_grace_seconds)
        broker = create_broker(settings, replica_id, metrics, topics.stream_rules)
        hub = Hub(broker, metrics, settings.max_connections_per_user)
        push = create_push(settings, broker, metrics)
        member_lists = MemberLists(broker, settings.presence_cache_seconds, MEMBERS_SHOWN)
        namespace_hooks = Hooks(settings, metrics) if any(o.hooked for o in settings.topics.values()) else None
        runtime = Runtime(
            settings,
            replica_id,
            metrics,
            broker,
            hub,
            TokenVerifier(settings),
            topics,
            member_lists,
            push=push,
            hooks=namespace_hooks,
        )
        if settings.publish_rate:
            runtime.publish_rate = KeyedRate(settings.publish_rate)
            metrics.publish_rate_buckets.set_function(runtime.publish_rate.__len__)
        runtime.member_publish_rate = KeyedRate(settings.member_publish_rate) if settings.member_publish_rate else None
        app.state.runtime = runtime  # for the server's drain hook, which runs outside any request
        await broker.start(hub.on_frame, hub.on_lost)
        if settings.webhooks:
            runtime.webhooks = _webhooks(settings, broker, metrics)
            runtime.reads = ReadMarkers(_tell_read(runtime.webhooks))
            if PresenceEvents.wanted(runtime.webhooks):
                watch = PresenceEvents(runtime.webhooks, topics.presence_on)
                broker.watch_presence(watch.changed, int(settings.presence_leave_grace_seconds * 1000))
            await runtime.webhooks.start()
        if wanted(runtime.webhooks, push is not None):
            checks = checks_for(broker)
            if push is not None:
                runtime.pushes = _pushes(push, broker, checks, settings.history_ttl_seconds, metrics)
                await runtime.pushes.start()
            runtime.fallbacks = fallbacks_for(
                runtime.webhooks, runtime.pushes, checks, broker, settings.history_ttl_seconds
            )
        try:
            async with AsyncExitStack() as hooks:
                for hook in process_hooks:
                    await hooks.enter_async_context(hook(runtime))
                logger.info("replica %s started", replica_id, extra={"replica": replica_id})
                yield {"runtime": runtime}
        finally:
            logs.flush_access_summary()
            if runtime.fallbacks is not None:
                await runtime.fallbacks.stop()
            if runtime.webhooks is not None:
                await runtime.webhooks.stop()
            if runtime.pushes is not None:
                await runtime.pushes.stop()
            if push is not None:
                await push.aclose()
            if namespace_hooks is not None:
                await namespace_hooks.aclose()
            await broker.stop()

    app = NotifyApp(
        title="notify-service",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    for module in (publish, topics, inbox, devices, events, webhooks, client_assets):
        app.include_router(module.router, responses=CONNECTION_ERRORS)
    app.include_router(health.router)  # probes: never refused at a ceiling (/readyz aside, as documented)
    _install_error_handlers(app)
    # Bearer tokens, never cookies: a browser page may read /me/* and /events cross-origin only with a token.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.allowed_origins or ["*"],
        allow_methods=["GET", "POST", "PUT", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key", "X-Request-ID"],
        expose_headers=["X-Request-ID", "Retry-After"],
    )
    app.add_middleware(RequestLimits, limit=settings.max_payload_bytes, batch_limit=settings.max_batch_bytes)
    return app


def _webhooks(settings: Settings, broker: Broker, metrics: Metrics) -> Webhooks:
    outbox = create_outbox(
        broker, settings.webhook_retry_seconds, settings.webhook_max_pending, settings.webhook_timeout_seconds
    )
    return Webhooks(settings, outbox, metrics)


def _pushes(push: Push, broker: Broker, checks: Checks, retention_seconds: float, metrics: Metrics) -> PushJobs:
    attempt = push_jobs.attempt_seconds(push.timeout_seconds)
    outbox = create_outbox(broker, push_jobs.RETRY_SECONDS, push_jobs.MAX_PENDING, attempt, "op")
    return PushJobs(push, outbox, checks, retention_seconds, metrics)


def _tell_read(webhooks: Webhooks) -> Callable[[str, str], None]:
    def tell(user_id: str, up_to: str) -> None:
        webhooks.emit_soon("notification.read", {"user": user_id, "up_to": up_to}, user_stream(user_id))

    return tell


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        _count(request, exc.code)
        return JSONResponse(exc.body(), exc.status_code, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, "invalid_request")
        details = [
            {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type", "")}
            for error in exc.errors()
        ]
        unparsed = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if unparsed is not None:
            summary = f"the body is not valid JSON: {unparsed.get('ctx', {}).get('error', 'cannot be parsed')}"
        else:
            summary = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details[:5])
        return JSONResponse({"error": "invalid_request", "message": summary, "details": details}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:
            # FastAPI's "error parsing the body", on a route that does not parse with `api.body`:
            # still a body that cannot be parsed, answered like every other one.
            _count(request, "invalid_request")
            return JSONResponse({"error": "invalid_request", "message": "the body cannot be parsed"}, 422)
        code = {401: "invalid_token", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        message = "missing token" if exc.status_code == 401 else str(exc.detail)
        return JSONResponse({"error": code, "message": message}, exc.status_code, headers=exc.headers)


def _count(request: Request, code: str) -> None:
    runtime: Runtime | None = getattr(request.state, "runtime", None)
    if runtime is not None:
        runtime.metrics.errors.labels(code).inc()
