"""redis-py's connections and pools, extended for the connector: connections that go to the primary
the connector follows under Sentinel (and tell it when they fail), and TLS handshakes whose failure
is said plainly, once, instead of showing up only as a broker that is never ready."""

from __future__ import annotations

import logging
import ssl
from typing import Any, Protocol

from redis.asyncio.connection import BlockingConnectionPool, SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...config.settings import Settings

logger = logging.getLogger("service.broker")

Address = tuple[str, int]


class PrimaryFollower(Protocol):
    """What a primary's pool asks of the connector (`Connector`)."""

    async def primary_address(self) -> Address: ...

    def suspect(self) -> None: ...


class PrimaryPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections go to the primary the connector knows, instead of asking a sentinel each time;
    a call finding every connection busy waits for one (see `Connector.client`)."""

    def __init__(self, service_name: str | None, sentinel: Sentinel, connector: PrimaryFollower, **kwargs: Any) -> None:
        self.connector = connector
        super().__init__(service_name, sentinel, **kwargs)

    async def get_master_address(self) -> Address:
        address = await self.connector.primary_address()
        if self.master_address != address:
            self.master_address = address
            await self.disconnect(inuse_connections=False)
        return address


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


class TlsConnection(_TlsReported, SSLConnection):
    pass


class PrimaryConnection(SentinelManagedConnection):
    """A connection to the Sentinel-named primary that reports its failures to the connector."""

    connection_pool: PrimaryPool

    async def connect(self) -> None:
        try:
            await super().connect()
        except (RedisConnectionError, RedisTimeoutError):
            self.connection_pool.connector.suspect()
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError):
            self.connection_pool.connector.suspect()  # READONLY arrives here as a ConnectionError
            raise


class PrimaryTlsConnection(_TlsReported, PrimaryConnection, SSLConnection):
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


def tls_options(settings: Settings) -> dict[str, Any]:
    return {
        "ssl_ca_certs": settings.redis_ca_file,
        "ssl_certfile": settings.redis_cert_file,
        "ssl_keyfile": settings.redis_key_file,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
