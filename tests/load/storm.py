"""A reconnect storm, measured: three replicas behind nginx, 2,000 sockets each; one is SIGKILLed.

    python -m tests.load.storm [--replicas 3] [--sockets-per-replica 2000] [--rate 300] [--before 15]
                               [--after 15] [--handshake-rate N|off] [--workers 3] [--json FILE] [--keep-logs]
    make storm

Starts a redis-server, `--replicas` replicas (`python -m service`) and nginx in front of them with
deploy/nginx.conf (rendered by deploy/cluster.py; `worker_connections` and `worker_rlimit_nofile`
raised, since a proxied socket holds two connections), all on 127.0.0.1. Then:

1. Opens `--replicas` × `--sockets-per-replica` WebSockets through nginx (users of two sockets each; nginx's
   least_conn spreads them), paced at `--connect-rate` a second, from `--workers` processes.
2. Publishes `POST /notify/{user}` through nginx to random users at `--rate` a second, each with an
   `Idempotency-Key`; an answer that is no answer (a dropped connection, 502, 503, 504, 429) is
   retried with the same key, as `service.client.Publisher` does.
3. After `--before` seconds, SIGKILLs the replica holding the most sockets. Its sockets see their
   connection drop and reconnect through nginx to the other two, each resuming with `since` and
   `broadcast_since` (its last ids, or the welcome's cursors).
4. Keeps publishing until the survivors hold every socket again and `--after` seconds more, then
   lets the last deliveries arrive.

Figures: the time from the kill until the last dropped socket was welcomed again (reconnected),
and until it had every notification whose publish was due before its new welcome (resumed);
notifications lost (answered 202 and missing on a socket of their user) and duplicated (a socket
receiving one twice, counted before any client-side dedupe), both of which must be 0; and the
delivery latency of the sockets that never moved, from the time a publish was due to the frame's
arrival, before the kill, during the storm (the kill until the last socket resumed), after, and
over the same 10 s after the kill whatever the cap, with a per-second timeline; beside it the
survivors' own `notify_delivery_latency_seconds`, and each process's CPU and the generator's
event-loop lag, which say where the time went.

The clients are lean (picows, callbacks, no task per frame), spread over worker processes so that
no one event loop has thousands of reconnects to make at once; they follow the rules of
`service.client.Listener`, with its default backoff: after a welcomed socket drops, reconnect after
a delay drawn from [0, 0.5 s]; after a refused or failed handshake, full jitter over
[0, min(30 s, 0.5 s × 2^failures)]; after 1012, [0.05, 0.5 s]; each stream resumes from its own cursor;
after a welcome that says `recovered: false`, the inbox (`GET /me/notifications`) gives what is newer
than the cursor.
"""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from array import array
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlencode

import orjson
from picows import WSError, WSFrame, WSInvalidStatusError, WSListener, WSMsgType, WSTransport, ws_connect

from service.client import Listener, _full_jitter
from tests.utils import SECRET, RedisServer, token

from .clients import Publisher, paced, perf
from .procs import cpu_seconds, http_ok

ROOT = Path(__file__).resolve().parents[2]
_listener_defaults = inspect.signature(Listener.__init__).parameters
BACKOFF_BASE: float = _listener_defaults["backoff_base"].default
BACKOFF_MAX: float = _listener_defaults["backoff_max"].default
RETRY_STATUSES = frozenset({0, 429, 502, 503, 504})
HANDSHAKE_REFUSED = 'notify_connections_refused_total{reason="max_handshake_rate"}'
LATENCY_BUCKET = "notify_delivery_latency_seconds_bucket"


def _cluster_module() -> ModuleType:
    """deploy/cluster.py (not a package): its nginx and port helpers."""
    spec = importlib.util.spec_from_file_location("notify_deploy_cluster", ROOT / "deploy" / "cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Config:
    sockets_per_replica: int = 2000
    replicas: int = 3
    rate: float = 300.0  # POST /notify/{user} per second
    before: float = 15.0  # seconds of publishing before the kill
    after: float = 15.0  # seconds of publishing after every socket is back
    timeout: float = 120.0  # longest wait for the sockets to come back
    connect_rate: float = 600.0  # first connects per second, over every worker
    handshake_rate: str | None = None  # NOTIFY_MAX_HANDSHAKE_RATE; None: the service's default
    workers: int = 3  # client processes
    drain: float = 3.0  # after the last publish was answered, for the last deliveries
    window: float = 10.0  # the same span after the kill whatever the cap: latency compared over it
    keep_logs: bool = False  # keep the replicas' and nginx's logs (a directory under /tmp)


# ---------------------------------------------------------------- the clients (in worker processes)


class Sock:
    """One client socket across its reconnects: its cursors, what it received, when it moved."""

    __slots__ = (
        "index",
        "token",
        "last_id",
        "last_broadcast_id",
        "seen",
        "inbox",
        "duplicates",
        "open",
        "welcomes",
        "drops",
        "attempts",
        "refusals",
        "recovered_false",
        "refetched",
        "held",
        "gave_up",
    )

    def __init__(self, index: int, secret_token: str) -> None:
        self.index = index
        self.token = secret_token
        self.last_id: str | None = None
        self.last_broadcast_id: str | None = None
        self.seen: set[int] = set()
        self.inbox: set[int] = set()  # taken from the inbox, not (yet) from the socket
        self.duplicates = 0
        self.open = False
        self.welcomes: list[float] = []
        self.drops: list[float] = []
        self.attempts: list[float] = []
        self.refusals: list[tuple[float, int]] = []  # (when, HTTP status; 0: no answer)
        self.recovered_false = 0
        self.refetched = 0  # notifications taken from the inbox after a welcome that said recovered: false
        self.held: list[tuple[float, dict[str, Any]]] | None = None  # frames that wait for a refetch
        self.gave_up: str | None = None

    def summary(self) -> dict[str, Any]:
        skip = ("token", "seen", "inbox", "held")
        return {name: getattr(self, name) for name in self.__slots__ if name not in skip} | {"seen": sorted(self.seen)}


def _id_key(id_: str) -> tuple[int, int]:
    ms, _, seq = id_.partition("-")
    return int(ms), int(seq or 0)


class Client:
    """One worker's sockets, and every notification frame they received (in arrays)."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.inbox_url = ws_url.replace("ws://", "http://").removesuffix("/ws") + "/me/notifications?limit=100"
        self.stopping = False
        self.socks: list[Sock] = []
        self.d_sock = array("i")
        self.d_k = array("i")
        self.d_due = array("d")  # when its publish was due (perf_counter: CLOCK_MONOTONIC, shared by processes)
        self.d_at = array("d")  # when it arrived
        self.connect_errors: collections.Counter[str] = collections.Counter()


class _Proto(WSListener):
    def __init__(self, client: Client, sock: Sock) -> None:
        self.client = client
        self.sock = sock
        self.welcomed = False
        self.close_code: int | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.welcomed:
            self.sock.open = False
            if not self.client.stopping:
                self.sock.drops.append(perf())
        if not self.closed.done():
            self.closed.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        now = perf()
        msg = orjson.loads(frame.get_payload_as_memoryview())
        kind = msg.get("type")
        sock = self.sock
        if kind == "notification":
            if sock.held is not None:
                sock.held.append((now, msg))  # after the inbox, as the Listener does
            else:
                _notification(self.client, sock, msg, now)
        elif kind == "welcome":
            self.welcomed = True
            sock.open = True
            sock.welcomes.append(now)
            if sock.last_id is None and isinstance(msg.get("cursor"), str):
                sock.last_id = msg["cursor"]
            if sock.last_broadcast_id is None and isinstance(msg.get("broadcast_cursor"), str):
                sock.last_broadcast_id = msg["broadcast_cursor"]
            if msg.get("recovered") is False:
                # The replica could not replay what this socket missed: the inbox has it.
                sock.recovered_false += 1
                sock.held = []
                asyncio.get_running_loop().create_task(_refetch(self.client, sock))


def _notification(client: Client, sock: Sock, msg: dict[str, Any], now: float, refetched: bool = False) -> None:
    id_ = msg["id"]
    if msg.get("broadcast"):
        sock.last_broadcast_id = id_
        return
    if refetched and sock.last_id is not None and _id_key(id_) <= _id_key(sock.last_id):
        return  # the Listener takes from the inbox only what is newer than its cursor
    if sock.last_id is None or _id_key(id_) > _id_key(sock.last_id):
        sock.last_id = id_
    data = msg.get("data")
    k = data.get("k") if isinstance(data, dict) else None
    if k is None:
        return
    if k in sock.seen:
        # Twice from the server (live or replayed) is a duplicate; the inbox overlapping what also
        # came live is not (the Listener drops the second copy by its id).
        if not refetched and k not in sock.inbox:
            sock.duplicates += 1
        sock.inbox.discard(k)
        return
    sock.seen.add(k)
    if refetched:
        sock.inbox.add(k)
        sock.refetched += 1
    client.d_sock.append(sock.index)
    client.d_k.append(k)
    client.d_due.append(data["t"])
    client.d_at.append(now)


async def _refetch(client: Client, sock: Sock) -> None:
    """`service.client.Listener` after `recovered: false`: the user's inbox, what is newer than the cursor."""

    def fetch() -> list[dict[str, Any]]:
        request = urllib.request.Request(client.inbox_url, headers={"Authorization": f"Bearer {sock.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            frames: list[dict[str, Any]] = orjson.loads(response.read())["notifications"]
            return frames

    try:
        frames = await asyncio.to_thread(fetch)
    except (OSError, ValueError) as exc:
        client.connect_errors[f"inbox: {type(exc).__name__}"] += 1
        frames = []
    now = perf()
    for frame in sorted(frames, key=lambda f: _id_key(str(f.get("id", "0-0")))):
        _notification(client, sock, frame, now, refetched=True)
    held, sock.held = sock.held or [], None
    for at, msg in held:
        _notification(client, sock, msg, at)


async def _run_socket(client: Client, sock: Sock, delay: float) -> None:
    """Connect, stay, reconnect with the Listener's backoff and cursors, until the run ends."""
    await asyncio.sleep(delay)
    failures = 0
    while not client.stopping:
        sock.attempts.append(perf())
        query = {"token": sock.token}
        if sock.last_id:
            query["since"] = sock.last_id
        if sock.last_broadcast_id:
            query["broadcast_since"] = sock.last_broadcast_id
        code: int | None = None
        try:
            _, proto = await ws_connect(
                lambda: _Proto(client, sock), f"{client.ws_url}?{urlencode(query)}", websocket_handshake_timeout=10
            )
        except WSInvalidStatusError as exc:
            status = int(exc.response.status) if exc.response is not None else 0
            sock.refusals.append((perf(), status))
            if status not in RETRY_STATUSES:
                sock.gave_up = f"HTTP {status}: {exc.raw_body!r}"[:300]
                return
            failures += 1
        except (OSError, TimeoutError, WSError) as exc:
            sock.refusals.append((perf(), 0))
            client.connect_errors[type(exc).__name__] += 1
            failures += 1
        else:
            assert isinstance(proto, _Proto)
            await proto.closed
            code = proto.close_code
            failures = 0 if proto.welcomed else failures + 1
        if client.stopping:
            return
        if code in (1000, 1009, 4401, 4403):
            sock.gave_up = f"closed {code}"
            return
        wait = _full_jitter(BACKOFF_BASE, BACKOFF_MAX, failures)
        if code == 1012:
            wait = random.uniform(0.05, max(0.1, BACKOFF_BASE))
        elif code == 4029:
            wait = max(wait, random.uniform(BACKOFF_BASE, BACKOFF_MAX))
        await asyncio.sleep(wait)


async def _loop_lag(lags: list[tuple[float, float]]) -> None:
    """How late this process's loop runs, every 10 ms, as (when, how late): a late loop shows as
    delivery latency."""
    while True:
        due = perf() + 0.01
        await asyncio.sleep(0.01)
        now = perf()
        lags.append((now, now - due))


async def _worker(ws_url: str, indices: list[int], connect_rate: float, pipe: Connection) -> None:
    client = Client(ws_url)
    client.socks = [Sock(i, token(f"s{i >> 1}", ttl=3600)) for i in indices]
    lags: list[tuple[float, float]] = []
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_reader(pipe.fileno(), lambda: stop.done() or stop.set_result(pipe.recv()))
    tasks = [asyncio.create_task(_run_socket(client, sock, n / connect_rate)) for n, sock in enumerate(client.socks)]
    lagging = asyncio.create_task(_loop_lag(lags))
    try:
        await stop
    finally:
        client.stopping = True
        loop.remove_reader(pipe.fileno())
        os.set_blocking(pipe.fileno(), True)  # the loop made it non-blocking; the report is large
        lagging.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, lagging, return_exceptions=True)
    pipe.send(
        {
            "socks": [sock.summary() for sock in client.socks],
            "deliveries": [
                client.d_sock.tobytes(),
                client.d_k.tobytes(),
                client.d_due.tobytes(),
                client.d_at.tobytes(),
            ],
            "lags": lags,
            "connect_errors": dict(client.connect_errors),
        }
    )


def worker_main(ws_url: str, indices: list[int], connect_rate: float, pipe: Connection) -> None:
    """A client process: its sockets until the main process says stop, then what they saw."""
    import uvloop

    _raise_fd_limit(4 * len(indices) + 1024)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the workers
    uvloop.run(_worker(ws_url, indices, connect_rate, pipe))


# ---------------------------------------------------------------- the processes under test


class Storm:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.cluster = _cluster_module()
        self.workdir = Path(tempfile.mkdtemp(prefix="notify-storm-"))
        self.redis = RedisServer()
        self.replicas: list[tuple[int, subprocess.Popen[bytes]]] = []
        self.nginx: Any = None
        self.port = 0

    def start(self) -> None:
        self.redis.start()
        env = {
            **os.environ,
            "NOTIFY_JWT_SECRET": SECRET,
            "NOTIFY_REDIS_URL": self.redis.url,
            "NOTIFY_REDIS_PREFIX": f"s{uuid.uuid4().hex[:8]}",
            "NOTIFY_LOG_LEVEL": "warning",
        }
        if self.config.handshake_rate is not None:
            env["NOTIFY_MAX_HANDSHAKE_RATE"] = self.config.handshake_rate
        for i in range(self.config.replicas):
            port = self.cluster.free_port()
            with open(self.workdir / f"replica{i + 1}.log", "wb") as log:
                command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
                proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            self.replicas.append((port, proc))
        for port, proc in self.replicas:
            deadline = time.monotonic() + 30
            while not http_ok(port, "/readyz"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"replica on {port} did not become ready:\n{self.replica_log(port)}")
                time.sleep(0.05)
        self.port = self.cluster.free_port()
        upstreams = [f"127.0.0.1:{port}" for port, _ in self.replicas]
        listen = f"127.0.0.1:{self.port}"
        self.nginx = self.cluster.Nginx(upstreams, listen)
        # deploy/nginx.conf holds 4,096 connections per worker, and a proxied socket takes two.
        template = self.cluster.NGINX_CONF.read_text()
        if "worker_connections 4096;" not in template:
            raise RuntimeError("deploy/nginx.conf changed: update the storm's worker_connections")
        template = template.replace("worker_connections 4096;", "worker_connections 16384;")
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        template = f"worker_rlimit_nofile {65536 if hard == resource.RLIM_INFINITY else hard};\n" + template
        self.nginx.conf.write_text(self.cluster.render_nginx_conf(upstreams, listen, template))
        checked = self.nginx.check()
        if checked.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{checked.stderr}")
        self.nginx.start()

    def replica_log(self, port: int) -> str:
        index = [p for p, _ in self.replicas].index(port)
        with contextlib.suppress(OSError):
            return (self.workdir / f"replica{index + 1}.log").read_text(errors="replace")[-3000:]
        return ""

    def other_pids(self, clients: list[int]) -> dict[str, list[int]]:
        """The processes beside the replicas whose CPU the storm shares: nginx's, Redis, the generator's."""
        import psutil

        assert self.nginx is not None and self.nginx.proc is not None and self.redis.proc is not None
        master = psutil.Process(self.nginx.proc.pid)
        return {
            "nginx": [master.pid, *(child.pid for child in master.children())],
            "redis": [self.redis.proc.pid],
            "generator": [os.getpid(), *clients],
        }

    def metrics(self, port: int) -> dict[str, float]:
        values: dict[str, float] = {}
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    with contextlib.suppress(ValueError):
                        values[name] = float(value)
        return values

    def stop(self) -> None:
        for _, proc in self.replicas:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        if self.nginx is not None:
            with contextlib.suppress(OSError):
                (self.workdir / "nginx.log").write_bytes(self.nginx.log_path.read_bytes())
            self.nginx.stop()
        self.redis.stop()
        if self.config.keep_logs:
            print(f"storm: the replicas' and nginx's logs are in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _latency(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {"deliveries": len(ms), "p50_ms": _pct(ms, 0.5), "p99_ms": _pct(ms, 0.99), "max_ms": max(ms, default=None)}


def _seconds(values: list[float]) -> dict[str, float | None]:
    return {"p50": _pct(values, 0.5), "p99": _pct(values, 0.99), "max": max(values, default=None)}


def _histogram(samples: list[dict[str, float]]) -> dict[float, float]:
    """notify_delivery_latency_seconds, cumulative count by upper bound (s), summed over replicas."""
    total: dict[float, float] = collections.defaultdict(float)
    for values in samples:
        for name, count in values.items():
            if name.startswith(LATENCY_BUCKET):
                bound = name[name.index('le="') + 4 : name.rindex('"')]
                total[float("inf") if bound == "+Inf" else float(bound)] += count
    return dict(total)


def _bucket_quantile(start: dict[float, float], end: dict[float, float], q: float) -> str:
    """The bucket the q-quantile of the deliveries between two scrapes falls in: "<= 25 ms"."""
    bounds = sorted(end)
    counts = [end[b] - start.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return "-"
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * counts[-1]:
            return "> 5000 ms" if bound == float("inf") else f"<= {bound * 1000:g} ms"
    return "-"


async def _wait(condition: Any, timeout: float, step: float = 0.05) -> bool:
    """Poll an async condition until it holds (True) or the time is up (False)."""
    deadline = perf() + timeout
    while not await condition():
        if perf() > deadline:
            return False
        await asyncio.sleep(step)
    return True


# ---------------------------------------------------------------- the run


async def run(config: Config, say: Any = print) -> dict[str, Any]:
    """Start everything, make the storm, stop everything; the figures."""
    _raise_fd_limit(4 * config.replicas * config.sockets_per_replica + 1024)
    storm = Storm(config)
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    try:
        await asyncio.to_thread(storm.start)
        return await _storm(storm, workers, say)
    finally:
        for proc, pipe in workers:
            if proc.is_alive():
                with contextlib.suppress(OSError):
                    pipe.send("stop")
        for proc, _ in workers:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        await asyncio.to_thread(storm.stop)


async def _storm(
    storm: Storm, workers: list[tuple[multiprocessing.process.BaseProcess, Connection]], say: Any
) -> dict[str, Any]:
    config = storm.config
    total = config.replicas * config.sockets_per_replica
    total += total % 2
    ws_url = f"ws://127.0.0.1:{storm.port}/ws"
    ports = [port for port, _ in storm.replicas]
    say(f"storm: nginx on {storm.port}, replicas on {', '.join(map(str, ports))}; {total} sockets")

    # Scrapes run in a thread: this loop publishes, and a busy replica may take a while to answer.
    async def scrape(of: list[int]) -> dict[int, dict[str, float]]:
        return dict(
            zip(of, await asyncio.gather(*(asyncio.to_thread(storm.metrics, port) for port in of)), strict=True)
        )

    async def connected(of: list[int]) -> float:
        return sum(values.get("notify_connections", 0.0) for values in (await scrape(of)).values())

    # ---- every socket open
    context = multiprocessing.get_context("spawn")
    t0 = perf()
    for w in range(config.workers):
        mine, theirs = context.Pipe()
        indices = list(range(w, total, config.workers))
        proc = context.Process(
            target=worker_main, args=(ws_url, indices, config.connect_rate / config.workers, theirs), daemon=True
        )
        proc.start()
        workers.append((proc, mine))

    async def all_open(of: list[int]) -> bool:
        return await connected(of) >= total

    if not await _wait(lambda: all_open(ports), total / config.connect_rate + config.timeout, 0.5):
        raise RuntimeError(f"only {await connected(ports):.0f} of {total} sockets opened")
    connect_s = perf() - t0
    await asyncio.sleep(2.0)  # presence writes and subscriptions settle
    per_replica = {port: values.get("notify_connections", 0.0) for port, values in (await scrape(ports)).items()}
    say(f"storm: {total} sockets open in {connect_s:.1f} s; per replica {per_replica}")

    # ---- publishing, all along
    users = total // 2
    rng = random.Random(7)
    user_of = array("i")
    accepted = bytearray()
    attempts = array("i")
    answered = array("d")  # when its publish was answered 202 (0: not yet)
    due_at = array("d")
    statuses: collections.Counter[int] = collections.Counter()
    retries = failed = 0
    pub = Publisher(storm.port, token("storm-publisher", "notify:publish", ttl=3600), max_connections=64)
    await pub.open(16)
    run_id = uuid.uuid4().hex[:8]

    def fire(k: int, due: float) -> None:
        user_of.append(rng.randrange(users))
        accepted.append(0)
        attempts.append(0)
        answered.append(0.0)
        due_at.append(due)
        send(k, due)

    def send(k: int, due: float) -> None:
        attempts[k] += 1
        body = orjson.dumps({"event": "storm", "data": {"k": k, "t": due}})

        def done(status: int, answer: bytes) -> None:
            nonlocal retries, failed
            statuses[status] += 1
            if 200 <= status < 300:
                accepted[k] = 1
                answered[k] = perf()
            elif status in RETRY_STATUSES and attempts[k] < 8:
                retries += 1
                asyncio.get_running_loop().call_later(random.uniform(0.05, 0.3), send, k, due)
            else:
                failed += 1

        pub.request(f"/notify/s{user_of[k]}", body, done, b"Idempotency-Key: %s-%d\r\n" % (run_id.encode(), k))

    lags: list[tuple[float, float]] = []  # this process's (the publisher's) and the workers' loop lag
    lagging = asyncio.create_task(_loop_lag(lags))
    publishing = asyncio.create_task(paced(config.rate, 10**9, fire, 10**6))
    published_from = perf()
    await asyncio.sleep(2.0)
    histogram_before = _histogram(list((await scrape(ports)).values()))
    await asyncio.sleep(max(0.0, config.before - 2.0))

    # ---- the kill
    victim_port = max(per_replica, key=lambda p: per_replica[p])
    victim = next(proc for port, proc in storm.replicas if port == victim_port)
    survivors = [(port, proc) for port, proc in storm.replicas if port != victim_port]
    survivor_ports = [port for port, _ in survivors]
    others = storm.other_pids([proc.pid for proc, _ in workers if proc.pid is not None])
    cpu0 = {str(port): cpu_seconds(proc.pid) for port, proc in survivors}
    cpu0 |= {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in others.items()}
    at_kill = await scrape(survivor_ports)
    killed_at = perf()
    victim.send_signal(signal.SIGKILL)

    async def scrape_at(when: float) -> dict[int, dict[str, float]]:
        await asyncio.sleep(max(0.0, when - perf()))
        return await scrape(survivor_ports)

    at_window_end = asyncio.create_task(scrape_at(killed_at + config.window))
    await asyncio.to_thread(victim.wait, 10)
    say(f"storm: SIGKILLed the replica on {victim_port} ({per_replica[victim_port]:.0f} sockets)")
    back = await _wait(lambda: all_open(survivor_ports), config.timeout, 0.25)
    back_at = perf()
    at_back = await scrape(survivor_ports)
    cpu = {str(port): cpu_seconds(proc.pid) for port, proc in survivors}
    cpu |= {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in others.items()}
    storm_wall = back_at - killed_at
    say(f"storm: the survivors hold {'every' if back else 'NOT every'} socket {storm_wall:.2f} s after the kill")
    await asyncio.sleep(config.after)
    at_window = await at_window_end
    publishing.cancel()
    lagging.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publishing
    with contextlib.suppress(asyncio.CancelledError):
        await lagging
    published_until = perf()
    await pub.drained(10.0)
    await asyncio.sleep(config.drain)
    at_end = await scrape(survivor_ports)
    pub.close()

    # ---- what the clients saw
    socks: list[dict[str, Any]] = [{}] * total
    d_sock, d_k, d_due, d_at = array("i"), array("i"), array("d"), array("d")
    connect_errors: collections.Counter[str] = collections.Counter()
    for _, pipe in workers:
        pipe.send("stop")
    for proc, pipe in workers:
        if not await asyncio.to_thread(pipe.poll, 60):
            raise RuntimeError("a client process did not report")
        part = pipe.recv()
        for sock in part["socks"]:
            socks[sock["index"]] = sock
        for target, raw in zip((d_sock, d_k, d_due, d_at), part["deliveries"], strict=True):
            target.frombytes(raw)
        lags += part["lags"]
        connect_errors.update(part["connect_errors"])
        await asyncio.to_thread(proc.join, 10)

    # ---- figures
    moved = [s for s in socks if any(t >= killed_at for t in s["drops"])]
    moved_ids = {s["index"] for s in moved}
    unmoved = {s["index"] for s in socks if not s["drops"]}
    welcomed_again = {s["index"]: next((t for t in s["welcomes"] if t >= killed_at), None) for s in moved}
    reconnect_s = [t - killed_at for t in welcomed_again.values() if t is not None]
    last_old: dict[int, float] = {}  # per moved socket: the last arrival of a notification due before its new welcome
    for i in range(len(d_sock)):
        s = d_sock[i]
        if s in moved_ids:
            again = welcomed_again[s]
            if again is not None and d_due[i] < again and d_at[i] > last_old.get(s, 0.0):
                last_old[s] = d_at[i]
    resumed_s = [max(t, last_old.get(s, 0.0)) - killed_at for s, t in welcomed_again.items() if t is not None]
    storm_end = killed_at + max(resumed_s, default=storm_wall)
    warm = published_from + 2.0
    windows = {
        "before": (warm, killed_at),
        "storm": (killed_at, storm_end),
        "after": (storm_end, published_until),
        "window": (killed_at, killed_at + config.window),
    }
    # Latency of the sockets that never moved, by window; "first try": only notifications whose
    # first publish was answered 202 (not those retried after the kill cut their publish short).
    first_try: dict[str, list[float]] = {name: [] for name in windows}
    retried: dict[str, list[float]] = {name: [] for name in windows}
    timeline: dict[int, list[float]] = collections.defaultdict(list)
    for i in range(len(d_sock)):
        if d_sock[i] not in unmoved:
            continue
        at, latency = d_at[i], d_at[i] - d_due[i]
        for name, (lo, hi) in windows.items():
            if lo <= at < hi:
                (first_try if attempts[d_k[i]] == 1 else retried)[name].append(latency)
        second = int((at - killed_at) // 1)
        if -5 <= second <= 20 and attempts[d_k[i]] == 1:
            timeline[second].append(latency)
    lost = 0
    seen = [set(s["seen"]) for s in socks]
    for k in range(len(accepted)):
        if accepted[k]:
            u = user_of[k]
            lost += (k not in seen[2 * u]) + (k not in seen[2 * u + 1])
    refusals: collections.Counter[int] = collections.Counter()
    retried_handshakes = 0
    for s in moved:
        refusals.update(status for t, status in s["refusals"] if t >= killed_at)
        retried_handshakes += sum(1 for t in s["attempts"] if t >= killed_at) - 1
    lag_ms: dict[str, dict[str, float | None]] = {
        name: {
            "p99": _pct([lag * 1000 for at, lag in lags if lo <= at < hi], 0.99),
            "max": max((lag * 1000 for at, lag in lags if lo <= at < hi), default=None),
        }
        for name, (lo, hi) in windows.items()
    }
    hist_kill = _histogram(list(at_kill.values()))
    hist_back = _histogram(list(at_back.values()))
    hist_end = _histogram(list(at_end.values()))
    return {
        "config": asdict(config),
        "sockets": total,
        "connect_seconds": connect_s,
        "per_replica_before": {str(k): v for k, v in per_replica.items()},
        "per_survivor_after": {str(p): at_end[p].get("notify_connections", 0.0) for p in survivor_ports},
        "killed_sockets": per_replica[victim_port],
        "moved": len(moved),
        "unmoved": len(unmoved),
        "every_socket_back": back,
        "survivors_hold_every_socket_s": storm_wall,
        "reconnected_s": {
            "p50": _pct(reconnect_s, 0.5),
            "p99": _pct(reconnect_s, 0.99),
            "max": max(reconnect_s, default=None),
        },
        "resumed_s": {"p50": _pct(resumed_s, 0.5), "p99": _pct(resumed_s, 0.99), "max": max(resumed_s, default=None)},
        "reconnected_by_second": dict(sorted(collections.Counter(int(r // 1) for r in reconnect_s).items())),
        "handshakes_retried_by_moved": retried_handshakes,
        "refusals_seen_by_moved": dict(sorted(refusals.items())),
        "refused_at_handshake_rate": {
            str(p): at_end[p].get(HANDSHAKE_REFUSED, 0.0) - at_kill[p].get(HANDSHAKE_REFUSED, 0.0)
            for p in survivor_ports
        },
        "broker_errors": {
            str(p): at_end[p].get("notify_broker_errors_total", 0.0) - at_kill[p].get("notify_broker_errors_total", 0.0)
            for p in survivor_ports
        },
        "cpu_during_storm": {k: (cpu[k] - cpu0[k]) / storm_wall for k in cpu} if storm_wall else {},
        "generator_loop_lag_ms": lag_ms,
        "published": len(accepted),
        "accepted": sum(accepted),
        "publish_retries": retries,
        "publish_failed": failed,
        "publish_statuses": dict(sorted(statuses.items())),
        "publish_seconds": published_until - published_from,
        "lost": lost,
        "duplicates": sum(s["duplicates"] for s in socks),
        "recovered_false": sum(s["recovered_false"] for s in socks),
        "refetched": sum(s["refetched"] for s in socks),
        "gave_up": [s["gave_up"] for s in socks if s["gave_up"]][:10],
        "connect_errors": dict(connect_errors),
        "unmoved_latency": {name: _latency(values) for name, values in first_try.items()},
        # How long a first-try publish due in each window waited for its 202: the part of a delivery's
        # latency spent before Redis (the publisher, nginx, the replica that took the publish).
        "publish_answer_latency": {
            name: _latency(
                [
                    answered[k] - due_at[k]
                    for k in range(len(answered))
                    if attempts[k] == 1 and answered[k] and lo <= due_at[k] < hi
                ]
            )
            for name, (lo, hi) in windows.items()
        },
        "unmoved_latency_retried_publishes": {name: _latency(values) for name, values in retried.items()},
        "unmoved_timeline": {k: _latency(v) for k, v in sorted(timeline.items())},
        "survivors_delivery_latency_p99": {
            "before": _bucket_quantile(histogram_before, _histogram([at_kill[p] for p in survivor_ports]), 0.99),
            "storm": _bucket_quantile(hist_kill, hist_back, 0.99),
            "after": _bucket_quantile(hist_back, hist_end, 0.99),
            "window": _bucket_quantile(hist_kill, _histogram(list(at_window.values())), 0.99),
        },
        "unmoved_slow_in_window": {
            f"over {ms} ms": sum(1 for x in first_try["window"] if x * 1000 > ms) for ms in (100, 250, 500)
        },
        "load_average": os.getloadavg(),
    }


def report(result: dict[str, Any]) -> str:
    """The figures as text: what docs/reliability.md quotes."""
    c = result["config"]

    def f(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    def s3(d: dict[str, Any]) -> str:
        return f"{f(d['p50'], 2)} / {f(d['p99'], 2)} / {f(d['max'], 2)} s"

    lines = [
        f"{result['sockets']:,} sockets on {c['replicas']} replicas behind nginx (before the kill: "
        f"{', '.join(f'{v:,.0f}' for v in result['per_replica_before'].values())}); {c['rate']:g} publishes/s "
        f"through nginx; NOTIFY_MAX_HANDSHAKE_RATE {c['handshake_rate'] or 'default'}",
        f"killed one holding {result['killed_sockets']:,.0f}: moved {result['moved']:,}, "
        f"unmoved {result['unmoved']:,}; "
        f"the survivors held every socket again {result['survivors_hold_every_socket_s']:.2f} s after the kill "
        f"({', '.join(f'{v:,.0f}' for v in result['per_survivor_after'].values())})",
        f"reconnected (welcomed again) p50 / p99 / max {s3(result['reconnected_s'])}; resumed (had everything "
        f"published before) {s3(result['resumed_s'])} after the kill; by second: {result['reconnected_by_second']}",
        f"handshakes retried by the moved: {result['handshakes_retried_by_moved']:,}; refusals they saw by status "
        f"(0: no answer): {result['refusals_seen_by_moved']}; refused at the handshake rate, per survivor: "
        f"{', '.join(f'{v:,.0f}' for v in result['refused_at_handshake_rate'].values())}",
        "CPU during the storm (share of one core): "
        + ", ".join(f"{k} {v:.0%}" for k, v in result["cpu_during_storm"].items()),
        f"published {result['published']:,}, accepted {result['accepted']:,} ({result['publish_retries']:,} retries, "
        f"{result['publish_failed']} failed; answers {result['publish_statuses']}); lost {result['lost']}, "
        f"duplicated {result['duplicates']}, welcomes with recovered:false {result['recovered_false']} "
        f"(survivors' broker errors {', '.join(f'{v:.0f}' for v in result['broker_errors'].values())}; "
        f"{result['refetched']} notifications taken from the inbox), "
        f"gave up {len(result['gave_up'])}",
        "",
        "| unmoved sockets | deliveries | p50 ms | p99 ms | max ms | survivors' own p99 "
        "| publish answered p50 / p99 ms | generator lag p99 / max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {"window": f"the {c['window']:g} s after the kill"}
    for name, w in result["unmoved_latency"].items():
        lag = result["generator_loop_lag_ms"][name]
        answer = result["publish_answer_latency"][name]
        lines.append(
            f"| {names.get(name, name)} | {w['deliveries']:,} | {f(w['p50_ms'])} | {f(w['p99_ms'])} | "
            f"{f(w['max_ms'])} | {result['survivors_delivery_latency_p99'][name]} | "
            f"{f(answer['p50_ms'])} / {f(answer['p99_ms'])} | {f(lag['p99'])} / {f(lag['max'])} |"
        )
    retried = result["unmoved_latency_retried_publishes"]
    lines += [
        "",
        f"unmoved deliveries slower than 100 / 250 / 500 ms in the {c['window']:g} s after the kill: "
        + " / ".join(str(n) for n in result["unmoved_slow_in_window"].values()),
        "(publishes retried after the kill cut them short, left out above: "
        + ", ".join(f"{n} {w['deliveries']} p99 {f(w['p99_ms'])} ms" for n, w in retried.items())
        + ")",
        "",
        "second after the kill: unmoved deliveries, p50 / p99 / max ms; moved sockets welcomed again",
    ]
    for second, w in result["unmoved_timeline"].items():
        lines.append(
            f"  {int(second):+3d} s: {w['deliveries']:5d}  {f(w['p50_ms']):>8} / {f(w['p99_ms']):>8} / "
            f"{f(w['max_ms']):>8}  {result['reconnected_by_second'].get(second, 0)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3, help="replicas behind nginx, one of them killed (3)")
    parser.add_argument("--sockets-per-replica", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=300.0, help="POST /notify/{user} per second (300)")
    parser.add_argument("--before", type=float, default=15.0, help="seconds of publishing before the kill (15)")
    parser.add_argument("--after", type=float, default=15.0, help="seconds after every socket is back (15)")
    parser.add_argument("--connect-rate", type=float, default=600.0, help="first connects per second (600)")
    parser.add_argument("--workers", type=int, default=3, help="client processes (3)")
    parser.add_argument("--handshake-rate", help="NOTIFY_MAX_HANDSHAKE_RATE of the replicas (default: the service's)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the replicas' and nginx's logs")
    parser.add_argument("--json", help="also write the figures to this file")
    ns = parser.parse_args(argv)
    if ns.replicas < 2:
        parser.error("--replicas must be at least 2: one is killed")
    config = Config(
        replicas=ns.replicas,
        sockets_per_replica=ns.sockets_per_replica,
        rate=ns.rate,
        before=ns.before,
        after=ns.after,
        connect_rate=ns.connect_rate,
        workers=ns.workers,
        handshake_rate=ns.handshake_rate,
        keep_logs=ns.keep_logs,
    )
    import uvloop

    started = time.time()
    result = uvloop.run(run(config))
    print("\n" + report(result))
    print(
        f"\n{os.cpu_count()} CPUs; load average at the end {', '.join(f'{x:.2f}' for x in result['load_average'])}; "
        f"{time.time() - started:.0f} s; {time.ctime()}"
    )
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1, default=str))
    ok = result["lost"] == 0 and result["duplicates"] == 0 and result["every_socket_back"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
