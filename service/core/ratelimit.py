"""Token buckets: the rate limits that publishers, members and client frames are held to, and
KeyedRate, one bucket per key (a publisher, a member) holding only the keys used lately."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field


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

    def full_at(self) -> float:
        """When it will have refilled (monotonic time): from then on it is the same as a new bucket."""
        return self.updated + (self.burst - self.tokens) / self.rate


class KeyedRate:
    """A TokenBucket per key, holding only the keys used lately: a bucket idle long enough to be
    full again is dropped, since a new one would be the same. Memory follows the keys of the last
    second or so, not every key ever seen."""

    def __init__(self, rate: float, burst: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()  # least recently used first

    def take(self, key: str) -> float:
        """0 if `key` may pass now, else the seconds until it may."""
        self._prune(time.monotonic())
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    def _prune(self, now: float) -> None:
        # Oldest first; a bucket refills within burst/rate seconds, so one still filling up only
        # delays the ones behind it by that much. Amortized O(1) per take.
        buckets = self._buckets
        while buckets:
            key, bucket = next(iter(buckets.items()))
            if bucket.full_at() > now:
                return
            del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
