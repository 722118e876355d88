"""The webhook endpoints' admin API (scope `notify:admin`): state, dead events, replay, re-enable."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import NotFound
from ..webhooks import Webhooks
from .body import JsonRoute
from .deps import AdminDep, RuntimeDep
from .models import ErrorBody
from .runtime import Runtime

router = APIRouter(tags=["webhooks"], route_class=JsonRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody, "description": "The token lacks the scope `notify:admin`."},
    404: {"model": ErrorBody, "description": "No webhooks configured, or no such endpoint."},
    503: {"model": ErrorBody, "description": "The queue (Redis) is unreachable."},
}


class EndpointState(BaseModel):
    index: int = Field(description="The endpoint's 0-based position in NOTIFY_WEBHOOKS.")
    url: str
    events: list[str] | None = Field(description="The event types it wants; null: every type.")
    pending: int
    delivered: int
    failed: int = Field(description="Failed attempts.")
    dead: int = Field(description="Events given up on, kept for replay.")
    last_success: str | None
    last_error: str | None
    last_error_at: str | None
    disabled: str | None = Field(description="Why it is disabled (it answered 410); null while enabled.")


class DeadEvent(BaseModel):
    id: str = Field(description="The event's `webhook-id`.")
    endpoint: int
    type: str
    attempts: int
    error: str = Field(description="What the last attempt got.")
    died: str | None
    event: dict[str, Any] = Field(description="The body that was sent.")


class Replay(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: list[Annotated[str, Field(max_length=64)]] | None = Field(
        None, max_length=10_000, description="The dead events to send again; left out: every one."
    )


class Replayed(BaseModel):
    replayed: int


def _webhooks(runtime: Runtime) -> Webhooks:
    if runtime.webhooks is None:
        raise NotFound("no webhooks are configured (NOTIFY_WEBHOOKS)")
    return runtime.webhooks


@router.get("/webhooks", response_model=list[EndpointState], responses=_ERRORS)
async def endpoints(admin: AdminDep, runtime: RuntimeDep) -> list[dict[str, Any]]:
    """Every endpoint of NOTIFY_WEBHOOKS with its queue, counts, last success and error, across replicas."""
    if runtime.webhooks is None:
        return []
    return await runtime.webhooks.status()


@router.get("/webhooks/dead", response_model=list[DeadEvent], responses=_ERRORS)
async def dead_events(
    admin: AdminDep, runtime: RuntimeDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[dict[str, Any]]:
    """Events given up on after the last retry (or refused with 410), newest first, with their last error."""
    return await _webhooks(runtime).dead(limit)


@router.post("/webhooks/dead/replay", response_model=Replayed, responses=_ERRORS)
async def replay(admin: AdminDep, runtime: RuntimeDep, body: Replay | None = None) -> Replayed:
    """Send dead events again, with fresh attempts and the same `webhook-id`: every one, or `{"ids": [...]}`."""
    ids = body.ids if body is not None else None
    return Replayed(replayed=await _webhooks(runtime).replay(ids))


@router.post("/webhooks/{index}/enable", response_model=EndpointState, responses=_ERRORS)
async def enable(
    index: Annotated[int, Path(ge=0, description="The endpoint's position in NOTIFY_WEBHOOKS.")],
    admin: AdminDep,
    runtime: RuntimeDep,
) -> dict[str, Any]:
    """Turn an endpoint disabled by a 410 back on, on every replica; its dead events can then be replayed."""
    webhooks = _webhooks(runtime)
    if index >= webhooks.endpoints:
        raise NotFound(f"no endpoint {index}: NOTIFY_WEBHOOKS has {webhooks.endpoints}")
    await webhooks.enable(index)
    return (await webhooks.status())[index]
