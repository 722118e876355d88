"""Token buckets: the rate limits that publishers, members and client frames are held to."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

# Keyed limits forget full buckets once they hold this many: the map stays as large as the keys
# that were busy lately, not every key ever seen.
_PRUNE_AT = 10_000


@dataclass(slots=True)
class TokenBucket:
    """`rate` events per second on average, bursts up to `burst` (default: `rate`)."""

    rate: float
    burst: float = 0.0
    tokens: float = 0.0
    updated: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.burst = self.burst or self.rate
        self.tokens = self.burst

    def take(self) -> float:
        """0 if an event may pass now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class KeyedRate:
    """One TokenBucket per key (a user id)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str) -> float:
        """0 if the key's event may pass now, else the seconds until one may."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune()
            bucket = self._buckets[key] = TokenBucket(self.rate)
        return bucket.take()

    def _prune(self) -> None:
        now = time.monotonic()
        full = [key for key, b in self._buckets.items() if b.tokens + (now - b.updated) * b.rate >= b.burst]
        for key in full:
            del self._buckets[key]
