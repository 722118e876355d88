"""A topic namespace's options: what NOTIFY_TOPICS maps each namespace name to."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TopicOptions(BaseModel):
    """One namespace's options (NOTIFY_TOPICS maps namespace names to these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    join: Literal["token", "any"] = "token"
    publish: bool = False
    signals: bool = False
    presence: bool = False
    join_leave: bool = False
    history_size: int | None = Field(None, gt=0)
    history_ttl_seconds: int | None = Field(None, gt=0)
    max_members: int | None = Field(None, gt=0)
    # Distinct topics of the namespace that may hold history at once (a topic holds it until its
    # last message is older than the history TTL); a publish to one more is refused with
    # `namespace_full`. null: no limit.
    max_topics: int | None = Field(1_000, gt=0)
