"""Counters, gauges and histograms for the hot paths: plain numbers, read when the registry is scraped.

prometheus_client's own take a lock and check the metric's state on every call: a publish touched
five of them, some thirty Python calls, more than its own id and keys cost. Every metric here is
written from the event loop's thread only (the service runs one), so a number needs no lock. They
register with the app's registry as collectors and are exported as prometheus_client exports its
own (`_total`, `_bucket`, `_sum`, `_count`, `_created`).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class Tally:
    """One counter (or one label value's): `inc` adds to it."""

    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class TallyCounter:
    """A counter with at most one label; `labels(value)` is its child for that value (look it up once)."""

    def __init__(self, name: str, documentation: str, label: str | None = None, *, registry: CollectorRegistry) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self._children: dict[str, Tally] = {} if label else {"": Tally()}
        registry.register(self)

    def labels(self, value: str) -> Tally:
        assert self._label is not None
        return self._children.setdefault(value, Tally())

    def inc(self, amount: float = 1) -> None:
        self._children[""].value += amount

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label] if self._label else None)
        for value, child in self._children.items():
            family.add_metric([value] if self._label else [], child.value, created=child.created)
        yield family


class TallyGauge:
    """A gauge with no labels: `set` gives it its value."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self.value = 0.0
        registry.register(self)

    def set(self, value: float) -> None:
        self.value = value

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, value=self.value)


class TallyHistogram:
    """A histogram with fixed buckets and no labels; `observe` counts a value in the first bucket that holds it."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], *, registry: CollectorRegistry) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: over every bound (+Inf)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    def collect(self) -> Iterator[Metric]:
        cumulative, total = [], 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        family = HistogramMetricFamily(self._name, self._documentation, buckets=cumulative, sum_value=self._sum)
        family.samples.append(Sample(self._name + "_created", {}, self._created))
        yield family
