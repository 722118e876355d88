"""Redis topologies for tests, as real processes on free loopback ports that the test owns.

- `SentinelTopology`: one primary, its replicas and three sentinels (`redis-server --sentinel`)
  that notice a dead primary after a second and fail over at once.
- `ClusterTopology`: a Redis Cluster of three primaries with a replica each (node timeout 1 s),
  over TLS if asked.
- `TestCA` and `tls_redis`: a certificate authority made in the test, and a Redis that speaks
  only TLS with a certificate it signed.

Every process is stopped by whoever started it (use them as context managers); nothing here
touches a Redis the test did not start.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from .utils import CLUSTER_PORTS, TIMEOUT, free_port, redis_binary


class Node:
    """One redis-server (a data node or a sentinel) of the test's own."""

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        sentinel_conf: str | None = None,
        password: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="notify-topology-")
        self.args = args or []
        self.sentinel_conf = sentinel_conf
        self.password = password
        self.tls = tls  # redis-py ssl_* options for reaching it; the node then listens on TLS only
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    def start(self) -> Node:
        if self.sentinel_conf is not None:
            conf = Path(self.dir, "sentinel.conf")  # Sentinel rewrites its file: each its own
            listen = f"port 0\ntls-port {self.port}\n" if self.tls else f"port {self.port}\n"
            conf.write_text(f"{listen}bind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n{self.sentinel_conf}")
            command = [redis_binary(), str(conf), "--sentinel"]
        else:
            listen = ["--tls-port", str(self.port), "--port", "0"] if self.tls else ["--port", str(self.port)]
            command = [
                redis_binary(),
                *listen,
                *("--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self.dir),
                *("--protected-mode", "no", "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"),
                *self.args,
            ]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            # A probe can fail redis-py's handshake in other ways too: one that connected to itself
            # (see `free_port`) reads its own HELLO back as a list (AttributeError). Asked again.
            with contextlib.suppress(redis.RedisError, AttributeError):
                if self.call("PING"):
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {command}")
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer: {command}")

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            password=self.password,
            decode_responses=True,
            socket_timeout=TIMEOUT,
            **({"ssl": True, **self.tls} if self.tls else {}),
        )

    def call(self, *args: Any) -> Any:
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def role(self) -> str | None:
        """'master', 'slave', or None when the node does not answer."""
        try:
            return str(self.call("ROLE")[0])
        except redis.RedisError:
            return None

    def pause(self) -> None:
        """SIGSTOP: its connections stay open and silent, as when its host vanished."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """SIGKILL: no goodbye to replicas, sentinels or clients."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelTopology:
    """A primary, `replicas` replicas and three sentinels (quorum 2, down after 1 s); with `tls`,
    every node and sentinel listens only on TLS, with certificates that CA signed."""

    def __init__(
        self,
        replicas: int = 1,
        master_name: str = "notify-test",
        password: str | None = None,
        sentinel_password: str | None = None,
        tls: TestCA | None = None,
    ) -> None:
        self.master_name = master_name
        self.password = password
        self.sentinel_password = sentinel_password
        self.tls = tls
        args = ["--requirepass", password, "--masterauth", password] if password else []
        reach: dict[str, Any] | None = None
        self._tls_conf = ""
        if tls is not None:
            cert, key = tls.issue("redis-node")
            files = {"tls-cert-file": cert, "tls-key-file": key, "tls-ca-cert-file": tls.cert_file}
            options = {**files, "tls-auth-clients": "no", "tls-replication": "yes"}  # replicas, sentinels: TLS too
            args += [part for name, value in options.items() for part in (f"--{name}", value)]
            self._tls_conf = "".join(f"{name} {value}\n" for name, value in options.items())
            reach = {"ssl_ca_certs": tls.cert_file}
        self.primary = Node(list(args), password=password, tls=reach)
        self.replicas = [Node(list(args), password=password, tls=reach) for _ in range(replicas)]
        # Ports are known from here on, so a URL can be handed out before anything runs.
        self.sentinels = [Node(sentinel_conf="", password=sentinel_password, tls=reach) for _ in range(3)]

    @property
    def nodes(self) -> list[Node]:
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        return f"{scheme}://{auth}{hosts}/{self.master_name}/0"

    def env(self, **extra: str) -> dict[str, str]:
        """Env for replicas of the service on this topology, in a key namespace of their own."""
        env = {"NOTIFY_REDIS_URL": self.url, "NOTIFY_REDIS_PREFIX": f"t{uuid.uuid4().hex[:10]}"}
        if self.sentinel_password:
            env["NOTIFY_REDIS_SENTINEL_PASSWORD"] = self.sentinel_password
        if self.tls:
            env["NOTIFY_REDIS_CA_FILE"] = self.tls.cert_file
        return {**env, **extra}

    def start(self) -> SentinelTopology:
        try:
            self.primary.start()
            for replica in self.replicas:
                replica.args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
                replica.start()
            name = self.master_name
            conf = (
                f"sentinel monitor {name} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {name} 1000\n"
                f"sentinel failover-timeout {name} 2000\n"
                f"sentinel parallel-syncs {name} 1\n"
                f"{self._tls_conf}"
            )
            if self.password:
                conf += f"sentinel auth-pass {name} {self.password}\n"
            if self.sentinel_password:
                conf += f"requirepass {self.sentinel_password}\n"  # and the sentinels use it among themselves
            for sentinel in self.sentinels:
                sentinel.sentinel_conf = conf
                sentinel.start()
            self._wait_settled()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_settled(self) -> None:
        """Until every replica is in sync and every sentinel knows the replicas and the other two."""
        deadline = time.monotonic() + 6 * TIMEOUT
        seen: object = "nothing: every query failed"  # the last state, for the error: it settles in about 2 s
        while time.monotonic() < deadline:
            try:
                links = [r.client().info("replication").get("master_link_status") for r in self.replicas]
                states = [s.client().sentinel_master(self.master_name) for s in self.sentinels]
            except redis.RedisError as exc:
                seen = f"{type(exc).__name__}: {exc}"
            else:
                known = [(st["num-slaves"], st["num-other-sentinels"]) for st in states]
                seen = f"replica links {links}, (replicas, other sentinels) each sentinel knows {known}"
                wanted = (len(self.replicas), len(self.sentinels) - 1)
                if all(link == "up" for link in links) and all(k == wanted for k in known):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"the sentinel topology did not settle; last seen: {seen}")

    def wait_promotion(self, old: Node, within: float) -> Node:
        """The node other than `old` that says it is the primary, once one does (the sentinels may
        not name it yet, and `old`, if still up, may still say it is the primary too)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node is not old and node.proc is not None and not node.paused and node.role() == "master":
                    return node
            time.sleep(0.02)
        raise AssertionError(f"no replica was promoted within {within}s")

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TestCA:
    """A certificate authority made for one test, and certificates it signs, as PEM files."""

    __test__ = False  # not a test class, whatever its name says to pytest

    def __init__(self, name: str = "notify test CA") -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir = Path(tempfile.mkdtemp(prefix="notify-ca-"))
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self._subject = subject
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = self._write(f"{uuid.uuid4().hex[:6]}-ca.pem", self._cert)

    def issue(self, name: str, client: bool = False, peer: bool = False) -> tuple[str, str]:
        """A certificate for 127.0.0.1 and localhost (or a client's; or, `peer`, both, as a cluster
        node's is: the cluster bus asks every node that connects for its certificate), and its key:
        two file paths."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if peer else []
        usages = usages or [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        key_file = self.dir / f"{name}-key.pem"
        key_file.write_bytes(key_pem)
        return self._write(f"{name}.pem", cert), str(key_file)

    def _write(self, filename: str, cert: Any) -> str:
        from cryptography.hazmat.primitives import serialization

        path = self.dir / filename
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def tls_redis(ca: TestCA, require_client_cert: bool = False) -> Node:
    """A Redis that listens only on TLS, with a certificate `ca` signed (not started yet)."""
    cert, key = ca.issue("redis-server")
    args = ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca.cert_file]
    args += ["--tls-auth-clients", "yes" if require_client_cert else "no"]
    reach: dict[str, Any] = {"ssl_ca_certs": ca.cert_file}
    if require_client_cert:
        reach["ssl_certfile"], reach["ssl_keyfile"] = ca.issue("test-client", client=True)
    return Node(args, tls=reach)


class ClusterTopology:
    """A Redis Cluster of `primaries` primaries with one replica each (node timeout 1 s); with `tls`,
    every node listens only on TLS (clients, the cluster bus and replication alike), with a
    certificate that CA signed."""

    def __init__(self, primaries: int = 3, tls: TestCA | None = None) -> None:
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--cluster-config-file", "nodes.conf"]
        # A replica that lost its primary fails over at once, however long it was disconnected.
        args += ["--cluster-replica-validity-factor", "0", "--cluster-allow-reads-when-down", "no"]
        reach: dict[str, Any] | None = None
        self._cli_tls: list[str] = []
        if tls is not None:
            cert, key = tls.issue("redis-cluster-node", peer=True)
            args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", tls.cert_file]
            args += ["--tls-auth-clients", "no", "--tls-cluster", "yes", "--tls-replication", "yes"]
            reach = {"ssl_ca_certs": tls.cert_file}
            self._cli_tls = ["--tls", "--cacert", tls.cert_file]
        self.tls = tls
        self.nodes = [Node(list(args), tls=reach) for _ in range(2 * primaries)]
        for node in self.nodes:
            # Both ports below the kernel's ephemeral ones: an outgoing connection (a test's, a
            # replica's) may take one of those between this check and the node's bind.
            node.port = free_port(CLUSTER_PORTS, bus=10000)
        self.primaries_wanted = primaries

    @property
    def url(self) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def env(self, **extra: str) -> dict[str, str]:
        env = {"NOTIFY_REDIS_URL": self.url, "NOTIFY_REDIS_PREFIX": f"t{uuid.uuid4().hex[:10]}"}
        if self.tls is not None:
            env["NOTIFY_REDIS_CA_FILE"] = self.tls.cert_file
        return {**env, **extra}

    def start(self) -> ClusterTopology:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [
                    shutil.which("redis-cli") or "redis-cli",
                    *self._cli_tls,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{n.port}" for n in self.nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=6 * TIMEOUT,
            )
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, within: float = 6 * TIMEOUT) -> None:
        """Until every live node says the cluster is ok and every slot has a live primary."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError):
                live = [n for n in self.nodes if n.proc is not None and not n.paused]
                if all("cluster_state:ok" in n.call("CLUSTER", "INFO") for n in live) and all(
                    r.client().info("replication").get("master_link_status", "up") == "up"
                    for r in live
                    if r.role() == "slave"
                ):
                    return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become healthy")

    def primaries(self) -> list[Node]:
        return [n for n in self.nodes if n.proc is not None and not n.paused and n.role() == "master"]

    def owner(self, key: str) -> Node:
        """The primary that holds `key`'s slot now."""
        slot = key_slot(key.encode())
        for start, end, primary, *_ in self.primaries()[0].call("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return next(n for n in self.nodes if n.port == int(primary[1]))
        raise LookupError(slot)

    def __enter__(self) -> ClusterTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
