"""Configuration: the one settings class, the NOTIFY_REDIS_URL forms and topic namespace options.

Read once at start-up; a bad value stops the process with one line. Imports nothing else of the service."""
