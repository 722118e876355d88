"""TLS to Redis (rediss://, rediss+sentinel://, rediss+cluster://): Redis that speaks only TLS, with a CA
made in the test."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from .test_faults import is_ready
from .test_rediscluster import spread_users
from .topology import ClusterTopology, Node, SentinelTopology, TestCA, tls_redis
from .utils import Client, Replica, publish, started


@pytest.fixture
def ca() -> Iterator[TestCA]:
    authority = TestCA()
    yield authority
    authority.remove()


def tls_env(node: Node, ca_file: str, **extra: str) -> dict[str, str]:
    return {
        "NOTIFY_REDIS_URL": f"rediss://127.0.0.1:{node.port}/0",
        "NOTIFY_REDIS_CA_FILE": ca_file,
        "NOTIFY_REDIS_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        **extra,
    }


async def delivered_end_to_end(http: httpx.AsyncClient, replica: Replica, user: str) -> None:
    client = await Client.connect(replica, user)
    await client.welcome()
    response = await publish(http, replica, user, "over-tls", {"secret": False})
    assert response.status_code == 202, response.text
    [frame] = await client.notifications(1)
    assert frame["id"] == response.json()["id"]
    await client.close()


async def test_tls_only_redis_delivers(ca, http):
    """A replica verifies a TLS-only Redis against the test CA and delivers end to end."""
    node = tls_redis(ca).start()
    try:
        with started(Replica(tls_env(node, ca.cert_file))) as (a,):
            await delivered_end_to_end(http, a, "tls-user")
    finally:
        node.stop()


async def test_tls_with_a_client_certificate(ca, http):
    """A Redis that requires client certificates (--tls-auth-clients yes) accepts the replica's."""
    node = tls_redis(ca, require_client_cert=True).start()
    try:
        cert, key = node.tls["ssl_certfile"], node.tls["ssl_keyfile"]  # type: ignore[index]
        env = tls_env(node, ca.cert_file, NOTIFY_REDIS_CERT_FILE=cert, NOTIFY_REDIS_KEY_FILE=key)
        with started(Replica(env)) as (a,):
            await delivered_end_to_end(http, a, "tls-client-cert")
    finally:
        node.stop()


@pytest.mark.slow
async def test_wrong_ca_is_refused_plainly(ca, http):
    """A CA that did not sign Redis's certificate: no connection is made, the log says why in one
    line (once, not at every retry), /readyz answers 503 and publishes 503."""
    node = tls_redis(ca).start()
    other = TestCA("some other CA")
    try:
        with started(Replica(tls_env(node, other.cert_file)), wait_ready=False) as (a,):
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                assert not await is_ready(http, a)
                await asyncio.sleep(0.2)
            response = await publish(http, a, "tls-user", "refused")
            assert response.status_code == 503, response.text
            lines = [line for line in a.output().splitlines() if "TLS handshake" in line]
            assert len(lines) == 1, a.output()
            assert f"127.0.0.1:{node.port}" in lines[0] and "certificate verify failed" in lines[0], lines[0]
            assert "NOTIFY_REDIS_CA_FILE" in lines[0]
    finally:
        other.remove()
        node.stop()


@pytest.mark.slow
async def test_tls_sentinel_topology_delivers(ca, http):
    """rediss+sentinel://: sentinels and data nodes all on TLS only; the replica asks the sentinels
    over TLS, reaches the primary they name over TLS (its certificate names 127.0.0.1, as the
    sentinels do), and delivers."""
    with SentinelTopology(replicas=1, tls=ca) as topo, started(Replica(topo.env())) as (a,):
        await delivered_end_to_end(http, a, "tls-sentinel")


@pytest.mark.slow
async def test_tls_cluster_delivers_from_every_primary(ca, http):
    """rediss+cluster://: a cluster on TLS only (clients, the cluster bus and replication); two
    replicas find the topology from the seeds over TLS, subscribe on every primary, and each user,
    one per primary, gets what was published on the other replica."""
    with ClusterTopology(tls=ca) as cluster:
        env = cluster.env()
        with started(Replica(env), Replica(env)) as (a, b):
            users = spread_users(cluster, a, count=1)
            clients = [await Client.connect(b, user) for user in users]
            for client in clients:
                await client.welcome()
            for user, client in zip(users, clients, strict=True):
                response = await publish(http, a, user, "over-tls", {"to": user})
                assert response.status_code == 202, response.text
                [frame] = await client.notifications(1)
                assert (frame["id"], frame["data"]) == (response.json()["id"], {"to": user})
            for client in clients:
                await client.close()
