"""Probes and metrics: /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..core.errors import BrokerUnavailable
from .deps import RuntimeDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(runtime: RuntimeDep) -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok", "replica": runtime.replica_id}


@router.get(
    "/readyz",
    responses={
        503: {"description": "Draining, the broker is unreachable, or the replica is at NOTIFY_MAX_CONNECTIONS."}
    },
)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready for traffic: not draining, and the broker answers with a live subscription."""
    if runtime.draining:
        return JSONResponse({"status": "draining", "message": "replica is shutting down"}, status_code=503)
    try:
        await runtime.broker.ping()
    except BrokerUnavailable as exc:
        return JSONResponse({"status": "unavailable", "message": exc.message}, status_code=503)
    return JSONResponse({"status": "ready", "replica": runtime.replica_id, "connections": len(runtime.hub)})


@router.get("/metrics", response_class=Response)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text format."""
    return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)
