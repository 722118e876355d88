"""The domain: stream names, ids, frames, topic names and namespaces, errors, rate buckets.

No sockets, no Redis, no HTTP. May import `service.config` only."""
