"""The HTTP and WebSocket surface: one router per concern (publish, topics, inbox, events, health), the
publish fast path's checks, the socket and SSE endpoints, the session that registers a client, request
body limits, and the app whose lifespan owns every per-replica object (`Runtime`).

May import delivery, auth, broker, telemetry, core and config; never the server."""
