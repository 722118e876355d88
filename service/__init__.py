"""User-targeted real-time notifications over WebSocket and SSE, fanned out through Redis."""

__version__ = "0.1.0"
