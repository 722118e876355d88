"""The inbox: a user's retained notifications, unread counts and read markers."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query

from ..broker import Inbox
from ..core.errors import NotFound
from .body import JsonRoute
from .deps import ClientDep, ReaderDep, RuntimeDep
from .models import (
    NOTIFICATION_ID_PATTERN,
    USER_ID_PATTERN,
    ErrorBody,
    InboxPage,
    MarkRead,
    NotificationItem,
    NotificationStatus,
    PushState,
    UnreadCount,
)

router = APIRouter(tags=["inbox"], route_class=JsonRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    503: {
        "model": ErrorBody,
        "description": "The broker is unreachable, or the replica is at NOTIFY_MAX_CONNECTIONS (see Retry-After).",
    },
}
Limit = Annotated[int, Query(ge=1, le=100, description="Page size.")]
Before = Annotated[
    str | None, Query(pattern=NOTIFICATION_ID_PATTERN, description="Only notifications older than this id.")
]


def _page(inbox: Inbox) -> InboxPage:
    return InboxPage(
        notifications=[NotificationItem(**orjson.loads(frame)) for frame in inbox.frames], unread=inbox.unread
    )


@router.get("/me/notifications", response_model=InboxPage, responses=_ERRORS)
async def my_notifications(
    principal: ClientDep, runtime: RuntimeDep, limit: Limit = 50, before: Before = None
) -> InboxPage:
    """The caller's retained notifications, newest first, with the unread count (also the polling fallback)."""
    return _page(await runtime.broker.inbox(principal.user_id, before, limit))


@router.post("/me/notifications/read", response_model=UnreadCount, responses=_ERRORS)
async def mark_read(body: MarkRead, principal: ClientDep, runtime: RuntimeDep) -> UnreadCount:
    """Mark everything up to `up_to` as read on all the caller's devices; the marker never moves back."""
    return UnreadCount(unread=await runtime.mark_read(principal.user_id, body.up_to))


@router.get("/users/{user_id:path}/notifications", response_model=InboxPage, responses=_ERRORS)
async def user_notifications(
    user_id: Annotated[str, Path(min_length=1, max_length=256, pattern=USER_ID_PATTERN)],
    reader: ReaderDep,
    runtime: RuntimeDep,
    limit: Limit = 50,
    before: Before = None,
) -> InboxPage:
    """A user's inbox, for backend services (scope `notify:read`)."""
    return _page(await runtime.broker.inbox(user_id, before, limit))


@router.get(
    "/notifications/{notification_id}",
    response_model=NotificationStatus,
    responses={**_ERRORS, 404: {"model": ErrorBody}},
)
async def notification_status(
    notification_id: Annotated[str, Path(pattern=NOTIFICATION_ID_PATTERN)],
    user: Annotated[str, Query(min_length=1, max_length=256, pattern=USER_ID_PATTERN)],
    reader: ReaderDep,
    runtime: RuntimeDep,
) -> NotificationStatus:
    """Whether the user has read a notification, and what became of its fallback (scope `notify:read`)."""
    state = await runtime.broker.read_state(user, notification_id)
    if not state.retained and not state.read:
        raise NotFound(f"no notification {notification_id} for {user!r} in retained history")
    fallback = "none"
    if runtime.fallbacks is not None:
        fallback = await runtime.fallbacks.state(user, notification_id, state)
    push = await runtime.pushes.state(user, notification_id) if runtime.pushes is not None else None
    return NotificationStatus(
        id=notification_id,
        user=user,
        read=state.read,
        retained=state.retained,
        fallback=fallback,
        push=PushState(**push) if push is not None else None,
    )
