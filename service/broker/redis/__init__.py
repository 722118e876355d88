"""The Redis broker: scripts that store and publish in one step, the pipelined connection that publishes
share, sharded subscriptions (one link per primary), presence, Sentinel and Cluster routing.

Every use of redis-py internals lives here. May import `service.broker.base`, `service.core`,
`service.config` and `service.telemetry`; never the api, delivery or auth."""
