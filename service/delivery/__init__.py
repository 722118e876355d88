"""Delivery on one replica: the hub (stream to open connections, subscribing only what is delivered)
and each connection's bounded, ordered path to its socket.

May import `service.broker`, `service.core`, `service.config` and `service.telemetry`."""
