"""A topic namespace's options: what NOTIFY_TOPICS maps each namespace name to."""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator


class TopicOptions(BaseModel):
    """One namespace's options (NOTIFY_TOPICS maps namespace names to these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "hook": the namespace's join_hook decides every join, the token's `topics` claim is not read.
    join: Literal["token", "any", "hook"] = "token"
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
    # Synchronous hooks (`api/hooks.py`): the backend is asked before each join (after the token
    # allowed it, or instead of the token with `join: "hook"`) and before each member's publish.
    join_hook: AnyHttpUrl | None = None
    publish_hook: AnyHttpUrl | None = None

    @model_validator(mode="after")
    def _hook_decides(self) -> TopicOptions:
        if self.join == "hook" and self.join_hook is None:
            raise ValueError('"join": "hook" needs a "join_hook" URL')
        return self

    @property
    def hooked(self) -> bool:
        return self.join_hook is not None or self.publish_hook is not None
