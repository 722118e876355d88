"""The processes under test: service replicas, Socket.IO servers (python and Node), redis-server; CPU and RSS
from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.utils import SECRET, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
NODE_DIR = Path(__file__).resolve().parent / "node"
# Node packages whose installed versions the report lists, by label: `redis` there is node-redis, not the server.
NODE_PACKAGES = {
    "socket.io": "socket.io",
    "engine.io": "engine.io",
    "ws": "ws",
    "@socket.io/redis-adapter": "@socket.io/redis-adapter",
    "redis": "node-redis",
    "jsonwebtoken": "jsonwebtoken",
}
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (from /proc/<pid>/stat)."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process, in seconds: its own code's CPU, and the kernel's on its behalf."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode}\n{detail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def http_ok(port: int, path: str) -> bool:
    """A tiny blocking GET, so readiness checks need no HTTP client."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
        s.settimeout(0.5)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return s.recv(16).startswith(b"HTTP/1.1 200")
    return False


def node_status() -> dict[str, Any]:
    """Whether the Node Socket.IO server can run here: `{"versions": {...}}`, or `{"left_out": why}`."""
    node = shutil.which("node")
    if node is None:
        return {"left_out": "node is not on PATH"}
    modules = NODE_DIR / "node_modules"
    declared = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    if not all((modules / package / "package.json").is_file() for package in declared):
        return {"left_out": f"its packages are not installed (`npm ci --prefix {NODE_DIR.relative_to(ROOT)}`)"}
    versions = {"node": "?"}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
        versions["node"] = out.strip().lstrip("v") or "?"
    for package, label in NODE_PACKAGES.items():
        try:
            versions[label] = json.loads((modules / package / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            versions[label] = "?"
    return {"versions": versions}


class Server:
    """One server process on a free loopback port."""

    def __init__(self, argv: list[str], env: dict[str, str], ready_path: str | None, cwd: Path = ROOT) -> None:
        self.cwd = cwd
        self.port = free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = {**os.environ, **env}
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="bench-server-", suffix=".log")
        os.close(fd)
        self.log = Path(name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> Server:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd)
        wait_port(self.port, self.proc, timeout, self.log)
        if self.ready_path:
            deadline = time.monotonic() + timeout
            while not http_ok(self.port, self.ready_path):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"server not ready:\n{self.output()}")
                time.sleep(0.05)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # no drain: the benchmark is over, and a drain would only cost time
            self.proc.wait(10)
        self.proc = None
        with contextlib.suppress(OSError):
            self.log.unlink()


@dataclass
class System:
    """A system under test: how to start one replica of it, given the shared Redis."""

    name: str
    kind: str  # "notify" or "socketio": which client protocol the generator speaks
    variant: dict[str, str] = field(default_factory=dict)  # runner options (the service only)
    env: dict[str, str] = field(default_factory=dict)
    # "service", "python" or "node" (the Socket.IO servers, sio_server.py and node/server.js), or
    # "lean-python" or "lean-node" (the lean references, lean_server.py and node/lean.js), or
    # "raw-python" (raw_server.py, the Python floor without uvicorn).
    server: str = "service"

    def replica(self, redis: RedisServer | None, namespace: str) -> Server:
        py = sys.executable
        if self.server != "service":
            assert redis is not None
            node = shutil.which("node")
            assert node is not None or "node" not in self.server, "node_status() decides whether this system runs"
            argv = {
                "python": [py, "-m", "tests.load.sio_server"],
                "node": [str(node), str(NODE_DIR / "server.js")],
                "lean-python": [py, "-m", "tests.load.lean_server"],
                "lean-node": [str(node), str(NODE_DIR / "lean.js")],
                "raw-python": [py, "-m", "tests.load.raw_server"],
            }[self.server]
            argv += ["--port", "{port}", "--redis", redis.url, "--channel", namespace]
            return Server(argv, {"BENCH_SECRET": SECRET, **self.env}, "/healthz")
        # The defaults a user gets from the README: only the secret (and Redis) set, so log level
        # info, the access log's summary, no handshake rate cap. What tuning them buys is measured
        # apart (`tests.load.logcost`, "What the defaults cost" in the report).
        env = {"NOTIFY_JWT_SECRET": SECRET, **self.env}
        if redis is not None:
            env |= {"NOTIFY_REDIS_URL": redis.url, "NOTIFY_REDIS_PREFIX": namespace}
        options = dict(self.variant)
        # tree=DIR: the service as another checkout has it (say, `git worktree add DIR <commit>`),
        # to weigh a change against its parent in one invocation.
        tree = Path(options.pop("tree")).resolve() if "tree" in options else ROOT
        if options:
            argv = [py, "-m", "tests.load.runner", "--port", "{port}"]
            for key, value in options.items():
                argv += [f"--{key}", value]
        else:
            argv = [py, "-m", "service", "--host", "127.0.0.1", "--port", "{port}"]
        return Server(argv, env, "/readyz", cwd=tree)


class Deployment:
    """Redis (unless embedded) plus `count` replicas of one system; CPU is read per process."""

    def __init__(self, system: System, count: int = 1, embedded: bool = False) -> None:
        self.system = system
        self.redis = None if embedded else RedisServer()
        namespace = f"b{uuid.uuid4().hex[:8]}"
        self.count = count
        self.namespace = namespace
        self.replicas: list[Server] = []
        self._unpinned: set[int] | None = None  # this process's CPUs before `pin`

    def __enter__(self) -> Deployment:
        try:
            if self.redis is not None:
                self.redis.start()
            for _ in range(self.count):
                self.replicas.append(self.system.replica(self.redis, self.namespace).start())
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for replica in self.replicas:
            replica.stop()
        if self.redis is not None:
            self.redis.stop()
        if self._unpinned is not None:
            _pin(os.getpid(), self._unpinned)
            self._unpinned = None

    def pin(self) -> None:
        """The replicas on the last CPU, Redis and this process (the load generator) on the others,
        until the deployment ends. Unpinned, the scheduler moves them onto each other and a round's
        CPU per request spreads by fifteen per cent; pinned, by a few: for weighing a change against
        its parent (`--pin`), not for the report, whose figures are a machine as users run it."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return
        self._unpinned = set(cpus)
        for replica in self.replicas:
            _pin(replica.pid, {cpus[-1]})
        if self.redis is not None and self.redis.proc is not None:
            _pin(self.redis.proc.pid, set(cpus[:-1]))
        _pin(os.getpid(), set(cpus[:-1]))

    def server_cpu(self) -> float:
        return sum(cpu_seconds(r.pid) for r in self.replicas)

    def server_cpu_split(self) -> tuple[float, float]:
        """(all, the kernel's part) of the replicas' CPU seconds, from one read of each."""
        splits = [cpu_split(r.pid) for r in self.replicas]
        return sum(u + k for u, k in splits), sum(k for _, k in splits)

    def redis_cpu(self) -> float:
        if self.redis is None or self.redis.proc is None:
            return 0.0
        return cpu_seconds(self.redis.proc.pid)

    def rss(self) -> int:
        return sum(rss_bytes(r.pid) for r in self.replicas)


class CpuWindow:
    """CPU seconds spent by the servers, Redis and this generator between start() and stop()."""

    def __init__(self, deployment: Deployment) -> None:
        self.d = deployment
        self.server = self.server_kernel = self.redis = self.generator = self.wall = 0.0

    def start(self) -> CpuWindow:
        (self._s0, self._k0), self._r0 = self.d.server_cpu_split(), self.d.redis_cpu()
        self._g0, self._w0 = cpu_seconds(os.getpid()), time.perf_counter()
        return self

    def stop(self) -> CpuWindow:
        server, kernel = self.d.server_cpu_split()
        self.server, self.server_kernel = server - self._s0, kernel - self._k0
        self.redis = self.d.redis_cpu() - self._r0
        self.generator = cpu_seconds(os.getpid()) - self._g0
        self.wall = time.perf_counter() - self._w0
        return self

    @property
    def kernel_share(self) -> float | None:
        """The kernel's part of the servers' CPU (system time): what no change to their code takes away."""
        return self.server_kernel / self.server if self.server else None


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process on these CPUs (threads it starts later inherit them)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(task), cpus)
