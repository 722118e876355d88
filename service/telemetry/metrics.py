"""Prometheus collectors on a registry the app owns (never the process-global default).

Those a publish or a delivery touches are tallies (`tally.py`): plain numbers, no lock per call."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .tally import TallyCounter, TallyGauge, TallyHistogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Every metric the service exports; one instance per app."""

    def __init__(self, replica_id: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = {"replica": replica_id}
        self.connections = Gauge("notify_connections", "Open client sockets (WebSocket and SSE).", [], registry=r)
        self.users_online = Gauge("notify_users_online", "Users with at least one socket on this replica.", registry=r)
        self.replica_info = Gauge("notify_replica_info", "Identity of this replica.", ["replica"], registry=r)
        self.replica_info.labels(**labels).set(1)
        self.published = TallyCounter(
            "notify_notifications_published", "Notifications accepted by the publish API.", "kind", registry=r
        )
        # Children looked up once.
        self.published_user = self.published.labels("user")
        self.published_broadcast = self.published.labels("broadcast")
        self.published_topic = self.published.labels("topic")
        self.publish_fast_path = TallyCounter(
            "notify_publish_fast_path",
            "Publish requests answered by the HTTP protocol itself, without the framework's route (api/fastpath.py).",
            registry=r,
        )
        self.publish_lane = TallyCounter(
            "notify_publish_lane",
            "Of those, the requests read whole by the publish lane rather than httptools (server/publishlane.py).",
            registry=r,
        )
        self.delivered = TallyCounter(
            "notify_notifications_delivered", "Notification frames queued to a socket on this replica.", registry=r
        )
        self.dropped = Counter(
            "notify_notifications_dropped", "Frames not delivered to a socket, by reason.", ["reason"], registry=r
        )
        self.errors = Counter("notify_errors", "Error answers and error frames, by code.", ["code"], registry=r)
        self.push_devices = Counter(
            "notify_push_devices",
            "Push devices registered and removed, by kind and change: registered, removed (by the user or a backend),"
            " dropped (over the cap), gone (its push service said so).",
            ["kind", "change"],
            registry=r,
        )
        self.pushes = Counter(
            "notify_pushes",
            "Push attempts, by kind (webpush, fcm), result (sent, gone, retried, failed; expired: a retry given"
            " up as its notification left history) and answer (the push service's HTTP status, or none when it"
            " could not be reached).",
            ["kind", "result", "answer"],
            registry=r,
        )
        self.push_encrypt_latency = Histogram(
            "notify_push_encrypt_seconds",
            "Time to encrypt one Web Push payload (aes128gcm, per device).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.push_send_latency = Histogram(
            "notify_push_send_seconds",
            "Time for one push attempt, from the request to the push service's answer.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.hook_calls = Counter(
            "notify_hook_calls",
            "Join and publish hook calls, by hook and outcome: allowed (200), refused (403), unavailable"
            " (any other answer, a timeout, an unreachable hook, or too many calls in flight).",
            ["hook", "outcome"],
            registry=r,
        )
        self.slow_consumers = Counter("notify_slow_consumers", "Sockets closed for not reading (4008).", registry=r)
        self.publish_latency = TallyHistogram(
            "notify_publish_latency_seconds",
            "Time to hand one notification to the broker.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = TallyHistogram(
            "notify_delivery_latency_seconds",
            "From publish (notification ts) to the frame reaching this replica's sockets.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.broker_reconnects = Counter(
            "notify_broker_reconnects", "Times the Redis subscription was rebuilt.", registry=r
        )
        self.probe_failures = Counter(
            "notify_broker_probe_failures", "Liveness probes that failed or did not come back.", registry=r
        )
        self.broker_task_restarts = Counter(
            "notify_broker_task_restarts",
            "Broker background tasks restarted after an unexpected error, by task.",
            ["task"],
            registry=r,
        )
        self.broker_errors = Counter("notify_broker_errors", "Failed Redis calls.", registry=r)
        self.presence_sweeps = Counter(
            "notify_presence_sweeps", "Topics this replica swept: leaves ended, joins and leaves announced.", registry=r
        )
        self.task_failures = Counter(
            "notify_background_task_failures", "Background tasks of the hub that ended with an error.", registry=r
        )
        self.broker_last_message = TallyGauge(
            "notify_broker_last_message_timestamp_seconds", "Unix time of the last message from the broker.", registry=r
        )
        by_type = ["type", "endpoint"]
        self.webhook_enqueued = Counter(
            "notify_webhook_events_enqueued", "Webhook events queued, by type and endpoint.", by_type, registry=r
        )
        self.webhook_delivered = Counter(
            "notify_webhook_events_delivered", "Webhook events answered 2xx, by type and endpoint.", by_type, registry=r
        )
        self.webhook_retried = Counter(
            "notify_webhook_events_retried", "Failed webhook attempts to be retried.", by_type, registry=r
        )
        self.webhook_dead = Counter(
            "notify_webhook_events_dead", "Webhook events given up on (kept for replay).", by_type, registry=r
        )
        self.webhook_dropped = Counter(
            "notify_webhook_events_dropped",
            "Webhook events not queued: the endpoint over NOTIFY_WEBHOOK_MAX_PENDING, or the queue unreachable.",
            by_type,
            registry=r,
        )
        self.webhook_latency = Histogram(
            "notify_webhook_delivery_latency_seconds",
            "From a webhook event to its endpoint's 2xx, retries included.",
            ["endpoint"],
            buckets=(*_LATENCY_BUCKETS, 10.0, 60.0, 600.0, 3600.0),
            registry=r,
        )
        self.webhook_pending = Gauge(
            "notify_webhook_pending",
            "Webhook events waiting for each endpoint (every replica's).",
            ["endpoint"],
            registry=r,
        )
        self.webhook_disabled = Gauge(
            "notify_webhook_endpoint_disabled",
            "1 while an endpoint is disabled (it answered 410).",
            ["endpoint"],
            registry=r,
        )

        self.accept_paused = Counter(
            "notify_accept_paused",
            "Times accepting connections paused for a second: no file descriptor left (EMFILE, ENFILE).",
            registry=r,
        )
        self.publish_rate_buckets = Gauge(
            "notify_publish_rate_buckets",
            "Publishers held to NOTIFY_PUBLISH_RATE right now (those seen within about the last second).",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
