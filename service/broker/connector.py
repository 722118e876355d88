"""Connector: the broker's Redis clients, made for the topology NOTIFY_REDIS_URL names.

TLS (rediss...): every connection verifies the server's certificate against NOTIFY_REDIS_CA_FILE
(else the system's CAs) and its host name, and may present NOTIFY_REDIS_CERT_FILE; a handshake
that fails is logged once, plainly, instead of showing up only as a broker that is never ready.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool, SSLConnection, UnixDomainSocketConnection

from ..settings import Settings
from .topology import Topology

logger = logging.getLogger("service.broker")


class Connector:
    """Makes the broker's clients."""

    def __init__(self, settings: Settings) -> None:
        topology = settings.redis_topology()
        assert topology is not None
        self.topology: Topology = topology
        tls = _tls_options(settings) if topology.tls else {}
        self._node_options: dict[str, Any] = {
            "username": topology.username,
            "password": topology.password,
            "db": topology.db,
            **tls,
        }

    def client(self, **options: Any) -> aioredis.Redis:
        """A client of the data node with these connection options."""
        kwargs = {**self._node_options, **options}
        topology = self.topology
        pool: ConnectionPool
        if topology.path is not None:
            pool = ConnectionPool(connection_class=UnixDomainSocketConnection, path=topology.path, **kwargs)
        else:
            (host, port), kind = topology.nodes[0], _TlsConnection if topology.tls else Connection
            pool = ConnectionPool(connection_class=kind, host=host, port=port, **kwargs)
        return aioredis.Redis.from_pool(pool)

    async def start(self) -> None:
        logger.info("redis: %s", self.topology.describe())

    async def aclose(self) -> None:
        pass


class _TlsReported:
    """Says plainly, once, why a TLS handshake failed (a wrong CA looks like Redis being down)."""

    host: str
    port: int

    async def _connect(self) -> None:
        try:
            await super()._connect()  # type: ignore[misc]
        except ssl.SSLError as exc:
            _tls_failed(f"{self.host}:{self.port}", exc)
            raise
        _tls_failures.clear()


class _TlsConnection(_TlsReported, SSLConnection):
    pass


_tls_failures: set[str] = set()


def _tls_failed(address: str, exc: ssl.SSLError) -> None:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"certificate verify failed: {exc.verify_message}"
    else:
        reason = str(exc.reason or exc).lower().replace("_", " ")
    line = f"redis: TLS handshake with {address} failed: {reason}"
    if line in _tls_failures:
        return
    _tls_failures.add(line)
    hint = (
        "NOTIFY_REDIS_CA_FILE must hold the CA that signed the Redis server's certificate, which must name the host"
        if isinstance(exc, ssl.SSLCertVerificationError)
        else "check NOTIFY_REDIS_CA_FILE, NOTIFY_REDIS_CERT_FILE and NOTIFY_REDIS_KEY_FILE against the server's"
        " TLS settings"
    )
    logger.error("%s; %s", line, hint)


def _tls_options(settings: Settings) -> dict[str, Any]:
    return {
        "ssl_ca_certs": settings.redis_ca_file,
        "ssl_certfile": settings.redis_cert_file,
        "ssl_keyfile": settings.redis_key_file,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
