"""What the service tells its operators: Prometheus metrics, the log configuration and the access log.

May import `service.config` and `service.core`."""
