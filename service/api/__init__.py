"""HTTP and WebSocket routes, one router per module."""
