from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from .utils import RedisServer, Replica, cluster_env


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session, on a free port; tests use their own key namespace."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill, pause or restart it."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def single() -> Iterator[Replica]:
    """One replica on the embedded broker."""
    replica = Replica().start()
    yield replica
    replica.stop()


@pytest.fixture(scope="session")
def pair(redis_server: RedisServer) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas sharing one Redis."""
    env = cluster_env(redis_server)
    a, b = Replica(env).start(), Replica(env).start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client
