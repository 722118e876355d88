"""Who the caller is: tokens verified with pinned algorithms, their scopes, claims and topic grants.

May import `service.config` and `service.core`."""
