"""The hot paths' tallies are scraped exactly as prometheus_client's own counters and histograms."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.telemetry.metrics import Metrics
from service.telemetry.tally import TallyCounter, TallyGauge, TallyHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
# Observations on, under and between the bounds, and past the last.
VALUES = (0.0, 0.001, 0.0010001, 0.05, 0.1, 0.99, 1.0, 7.5)


def _scrape(registry: CollectorRegistry) -> str:
    # The creation times differ by construction; everything else must not.
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", generate_latest(registry).decode())


def test_a_tally_scrapes_as_prometheus_clients_own() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    plain = TallyCounter("c_plain", "a counter", registry=ours)
    reference_plain = Counter("c_plain", "a counter", registry=theirs)
    kinds = TallyCounter("c_kinds", "a counter by kind", "kind", registry=ours)
    reference_kinds = Counter("c_kinds", "a counter by kind", ["kind"], registry=theirs)
    times = TallyHistogram("h_seconds", "a histogram", BUCKETS, registry=ours)
    reference_times = Histogram("h_seconds", "a histogram", buckets=BUCKETS, registry=theirs)
    last = TallyGauge("g_last", "a gauge", registry=ours)
    reference_last = Gauge("g_last", "a gauge", registry=theirs)
    for n, value in enumerate(VALUES):
        plain.inc(n)
        reference_plain.inc(n)
        kinds.labels("user" if n % 3 else "topic").inc()
        reference_kinds.labels("user" if n % 3 else "topic").inc()
        times.observe(value)
        reference_times.observe(value)
        last.set(value)
        reference_last.set(value)
    assert _scrape(ours) == _scrape(theirs)
    assert 'c_kinds_total{kind="user"} 5.0' in _scrape(ours)
    assert 'h_seconds_bucket{le="0.001"} 2.0' in _scrape(ours)  # a bound holds the value equal to it
    assert "g_last 7.5" in _scrape(ours)


def test_the_service_exports_its_publish_and_delivery_tallies() -> None:
    metrics = Metrics("r1")
    metrics.published_user.inc()
    metrics.published_topic.inc()
    metrics.published_topic.inc()
    metrics.delivered.inc(2)
    metrics.delivery_latency.observe(0.003)
    metrics.broker_last_message.set(1.5e9)
    text = metrics.render().decode()
    assert 'notify_notifications_published_total{kind="user"} 1.0' in text
    assert 'notify_notifications_published_total{kind="topic"} 2.0' in text
    assert 'notify_notifications_published_total{kind="broadcast"} 0.0' in text
    assert "notify_notifications_delivered_total 2.0" in text
    assert 'notify_delivery_latency_seconds_bucket{le="0.0025"} 0.0' in text
    assert 'notify_delivery_latency_seconds_bucket{le="0.005"} 1.0' in text
    assert "notify_publish_fast_path_total 0.0" in text
    assert "notify_broker_last_message_timestamp_seconds 1.5e+09" in text
