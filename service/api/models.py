"""REST bodies: what the publish, inbox and read APIs accept and answer."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

USER_ID_PATTERN = r"^[^\s\x00-\x1f\x7f-\x9f]{1,256}$"
NOTIFICATION_ID_PATTERN = r"^[0-9]{1,15}-[0-9]{1,19}$"

UserId = Annotated[str, Field(min_length=1, max_length=256, pattern=USER_ID_PATTERN, examples=["alice"])]
EventName = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$", examples=["order.shipped"]),
]
NotificationId = Annotated[str, Field(pattern=NOTIFICATION_ID_PATTERN, examples=["1764079200000-42"])]


class PublishRequest(BaseModel):
    """One notification: an event name and any JSON value."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"event": "order.shipped", "data": {"order": 7}}]}
    )

    event: EventName
    data: Any = None


class PlainPublish:
    """A publish of an event name and data only, the common body: what `api.fastpath` reads without
    building a `PublishRequest` (it checks what the model would); `api.publish` takes either."""

    __slots__ = ("event", "data")

    def __init__(self, event: str, data: Any) -> None:
        self.event = event
        self.data = data


MAX_FALLBACK_SECONDS = 604_800


class Fallback(BaseModel):
    """What the backend asks to hear about this notification, as a webhook event."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"when": "unread", "after_seconds": 60}]})

    when: Literal["unread", "offline"] = Field(
        description="`offline`: `notification.undelivered` at once when none of the user's sockets or SSE streams is"
        " open (`online` is 0). `unread`: `notification.unread` when the notification is still retained and unread"
        " `after_seconds` after it was published; a read before then cancels it."
    )
    after_seconds: Annotated[int, Field(ge=0, le=MAX_FALLBACK_SECONDS, strict=True)] | None = Field(
        None, description="For `unread`: seconds to wait (default 60). Ignored for `offline`."
    )


class PushContent(BaseModel):
    """What the user's devices show when the fallback fires (Web Push and FCM)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"title": "Order shipped", "url": "https://example.com/o/7"}]}
    )

    title: str = Field(min_length=1, max_length=200)
    body: str | None = Field(None, max_length=2000)
    url: str | None = Field(None, max_length=2000, description="Opened (or focused) when the notification is clicked.")
    icon: str | None = Field(None, max_length=2000)
    tag: str | None = Field(
        None, min_length=1, max_length=200, description="A newer push with the same tag replaces an undelivered one."
    )
    data: Any = None


class NotifyRequest(PublishRequest):
    """One notification to a user, with an optional fallback and push."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"event": "order.shipped", "data": {"order": 7}},
                {"event": "chat.message", "data": {"text": "hi"}, "fallback": {"when": "unread", "after_seconds": 60}},
                {"event": "chat.message", "push": {"title": "New message", "body": "hi"}},
            ]
        },
    )

    fallback: Fallback | None = None
    push: PushContent | None = Field(
        None,
        description="Pushed to every device of the user when the fallback fires (`offline` when no `fallback` is"
        " given). Ignored when the service has neither Web Push nor FCM configured. 422 when it would be over"
        " 4,096 bytes encrypted.",
    )


class BatchItem(NotifyRequest):
    """One notification of a batch, with its recipient: a user, or a topic."""

    model_config = ConfigDict(extra="forbid")

    user: UserId | None = None
    topic: str | None = Field(None, min_length=1, max_length=200, examples=["chat:lobby"])

    @model_validator(mode="after")
    def _one_recipient(self) -> BatchItem:
        if (self.user is None) == (self.topic is None):
            raise ValueError('an item names exactly one of "user" and "topic"')
        if (self.fallback is not None or self.push is not None) and self.user is None:
            raise ValueError('"fallback" and "push" are for notifications to a user')
        return self


class TopicAccepted(BaseModel):
    """The message is stored in the topic's history and handed to every replica."""

    id: str = Field(description="Unique, opaque; ordered within the topic.")
    ts: int = Field(description="Publish time, unix milliseconds.")
    members: int = Field(description="The topic's distinct members across replicas, now.")
    duplicate: bool = Field(False, description="True when an Idempotency-Key repeated an earlier request.")


class TopicPresence(BaseModel):
    """A topic's members: distinct users across replicas."""

    topic: str
    count: int
    users: list[str] = Field(description="Sorted; at most 1,000.")
    truncated: bool = Field(False, description="True when there are more members than `users` lists.")


class TopicHistory(BaseModel):
    """A topic's retained messages, newest first."""

    topic: str
    notifications: list[dict[str, Any]]


class PublishAccepted(BaseModel):
    """The notification is stored and handed to every replica."""

    id: str = Field(description="Unique, opaque; ordered within the user's (or the broadcast) stream.")
    ts: int = Field(description="Publish time, unix milliseconds.")
    online: int | None = Field(None, description="The user's open sockets across replicas (user notifications only).")
    duplicate: bool = Field(False, description="True when an Idempotency-Key repeated an earlier request.")


class BatchItemResult(BaseModel):
    """The outcome of one batch item: `id` when accepted, else `error` with `status`."""

    status: int
    id: str | None = None
    ts: int | None = None
    online: int | None = None
    duplicate: bool = False
    error: str | None = None
    message: str | None = None


class BatchAccepted(BaseModel):
    results: list[BatchItemResult]


class NotificationItem(BaseModel):
    """A stored notification, with the fields of its socket frame."""

    model_config = ConfigDict(extra="allow")

    type: str = "notification"
    id: str
    event: str
    data: Any = None
    ts: int


class InboxPage(BaseModel):
    """A page of a user's notifications, newest first, and how many are unread."""

    notifications: list[NotificationItem]
    unread: int


class MarkRead(BaseModel):
    """Everything up to and including this id counts as read."""

    model_config = ConfigDict(extra="forbid")

    up_to: NotificationId


class UnreadCount(BaseModel):
    unread: int


class PushState(BaseModel):
    state: Literal["none", "pending", "sent", "failed"] = Field(
        description="`none`: not pushed (no `push`, the fallback did not fire, or no device); `pending`: queued for"
        " `devices` devices; `sent`: at least one device's push service took it; `failed`: refused (or given up"
        " when it left history) for a device, and no device took it yet."
    )
    devices: int = Field(description="The devices it was queued for.")


class NotificationStatus(BaseModel):
    id: str
    user: str
    read: bool
    retained: bool
    fallback: Literal["pending", "sent", "cancelled", "none"] = Field(
        "none",
        description="What became of the notification's `fallback`: `pending` (an `unread` check not yet due),"
        " `sent` (its webhook event was queued), `cancelled` (read, or gone from history, before it was due),"
        " `none` (no fallback, an `offline` one while the user was online, or no endpoint wanting its event).",
    )
    push: PushState | None = Field(None, description="What became of the notification's `push` (when push is on).")


class ErrorBody(BaseModel):
    """Every error answer: a stable code and a message saying what was wrong."""

    error: str = Field(examples=["invalid_token"])
    message: str = Field(examples=["token expired"])
    details: list[dict[str, Any]] | None = None
