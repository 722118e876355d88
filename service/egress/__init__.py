"""What leaves the service over HTTP (webhooks, hooks, pushes): the client they share."""

from .http import Answer, Client, HTTPError

__all__ = ["Answer", "Client", "HTTPError"]
