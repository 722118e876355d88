"""TopicBudget: how many topics of a namespace may hold history in Redis at once (`max_topics`).

Every namespace has a sorted set of the topics that hold history, scored by when a publish to
them was last admitted; an entry outlives its topic's history (the TTL from its last message)
because each replica admits a topic again at least every `_READMIT_SECONDS` while publishing to
it, and entries are kept that much longer than the TTL. A publish to a topic outside the set
while it is full is refused. The set has a key of its own (hash tag `n:<namespace>`), in another
slot than the topic's: the check is a round trip before the publish, made at most once per
`_READMIT_SECONDS` per topic and replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ...core.errors import NamespaceFull
from ..base import StreamRules
from . import scripts
from .cluster import ClusterPipelines
from .pipeline import AutoPipeline, Lua

_READMIT_SECONDS = 10.0
# Topics this replica remembers admitting; beyond it, the stale ones are forgotten.
_REMEMBERED = 100_000


class TopicBudget:
    """Admits publishes to topics while their namespace has room (see the module docstring)."""

    def __init__(self, pipeline: AutoPipeline | ClusterPipelines, prefix: str, ttl_ms: Callable[[str], int]) -> None:
        self._pipeline = pipeline
        self._prefix = prefix
        self._ttl_ms = ttl_ms
        self._script = Lua.of(scripts.ADMIT)
        self._admitted: dict[str, float] = {}  # stream -> when this replica last had it admitted

    async def admit(self, stream: str, rules: StreamRules) -> None:
        """Return when the topic may hold history; NamespaceFull when it may not (raises what
        Redis raises, too)."""
        if rules.max_topics is None:
            return
        now = time.monotonic()
        if now - self._admitted.get(stream, -_READMIT_SECONDS) < _READMIT_SECONDS:
            return
        key = f"{self._prefix}:{{n:{rules.namespace}}}:topics"
        lasting = self._ttl_ms(stream) + int(_READMIT_SECONDS * 1000)
        if not await self._pipeline.evaluate(self._script, [key], [stream[2:], lasting, rules.max_topics]):
            raise NamespaceFull(rules.namespace, rules.max_topics)
        if len(self._admitted) >= _REMEMBERED:
            self._admitted = {s: at for s, at in self._admitted.items() if now - at < _READMIT_SECONDS}
        self._admitted[stream] = now
