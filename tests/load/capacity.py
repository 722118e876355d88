"""The capacity session: what one publish costs Redis, on one Redis and on a three-primary Redis Cluster,
and what the service spends per delivery in either mode, in one invocation.

- `raw_ceiling`: the publish script alone, no service: a driver pipelines the very command the service
  sends (EVALSHA of scripts.PUBLISH, built by RedisBroker.publish itself) to a fresh redis-server as fast
  as that server takes it, with streams below their history cap and then at it (every publish trims), and
  memory per stream and per history entry from `INFO memory`; then the broadcast stream, one publish at a
  time, without and with subscriber connections on its channel: what each subscriber adds per publish.
- `run_mode`: one service replica on one Redis (`single`) or on `tests.topology.ClusterTopology` (three
  primaries, a replica each: `cluster`), sockets connected, history already at its cap, then
  `POST /notify/{user}` at a fixed rate: Redis CPU of every redis-server (primaries summed, replicas apart)
  and the service's CPU, from /proc; and the same publishes pipelined straight to those primaries.

`make bench` runs it (the session `capacity`); docs/capacity.md builds its model on the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import selectors
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import hiredis

from tests.utils import SECRET, RedisServer

from . import workloads as W
from .clients import Fleet, Publisher
from .procs import CpuWindow, Deployment, System, cpu_seconds

MODES = ("single", "cluster")


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- the service's own publish command


async def publish_commands(
    url: str, prefix: str, streams: Sequence[str], data: bytes = b'{"t":0.0,"k":0,"r":0}'
) -> list[bytes]:
    """The exact bytes RedisBroker.publish sends for one notification to each stream (EVALSHA of the
    publish script with its 5 keys and 9 arguments): the broker builds them, its script run is replaced by a
    capture, so the command follows whatever the service does."""
    from service.broker.base import StreamRules
    from service.broker.redis.broker import RedisBroker
    from service.config.settings import Settings
    from service.telemetry.metrics import Metrics

    settings = Settings(redis_url=url, redis_prefix=prefix, jwt_secret=SECRET)
    broker = RedisBroker(settings, "capacity", Metrics("capacity"), lambda stream: StreamRules())
    captured: list[bytes] = []

    async def capture(head: dict[str, bytes], body: bytes, key: str) -> Any:
        captured.append(head["EVALSHA"] + body)
        return ("0-1", 0, -1)

    broker._script.run = capture  # type: ignore[method-assign]
    try:
        for stream in streams:
            await broker.publish(stream, '"bench"', data.decode(), None)
    finally:
        await broker._redis.aclose()
    return captured


def history_size() -> int:
    from service.config.settings import Settings

    return int(Settings.model_fields["history_size"].default)


# ---- a raw RESP driver (blocking sockets: it runs in a thread of its own)


def _command(*args: str | bytes) -> bytes:
    from service.broker.redis.resp import command

    return command(*args)


class _Raw:
    """One blocking connection to a redis-server: pipelined commands, replies counted by hiredis."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()

    def call(self, *args: str | bytes) -> Any:
        self.sock.sendall(_command(*args))
        return self._one()

    def _one(self) -> Any:
        while (reply := self.reader.gets()) is False:
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.reader.feed(data)
        return reply

    def pipelined(self, batch: bytes, per_batch: int, batches: int, deadline: float) -> tuple[int, int]:
        """Send `batches` copies of `batch` (each `per_batch` commands), two in flight at most, and read every
        reply; stops early at `deadline` (monotonic), once what was sent has been answered. (replies, errors)"""
        sent = answered = errors = 0
        total = 0
        while True:
            while sent < batches and sent * per_batch - answered < 2 * per_batch and time.monotonic() < deadline:
                self.sock.sendall(batch)
                sent += 1
                total += per_batch
            if answered >= total:
                return answered, errors
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("redis closed the connection")
            self.reader.feed(data)
            while (reply := self.reader.gets()) is not False:
                answered += 1
                if isinstance(reply, hiredis.ReplyError):
                    errors += 1

    def one_at_a_time(self, command: bytes, seconds: float) -> tuple[int, int]:
        """The command again and again, each sent once the previous one is answered."""
        count = errors = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.sendall(command)
            if isinstance(self._one(), hiredis.ReplyError):
                errors += 1
            count += 1
        return count, errors

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Subscribers:
    """`count` connections subscribed (SSUBSCRIBE) to one channel, read and discarded by a thread."""

    def __init__(self, port: int, channel: str, count: int) -> None:
        self.conns = [_Raw(port) for _ in range(count)]
        for conn in self.conns:
            conn.call("SSUBSCRIBE", channel)
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        with selectors.DefaultSelector() as sel:
            for conn in self.conns:
                conn.sock.setblocking(False)
                sel.register(conn.sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    with contextlib.suppress(BlockingIOError):
                        self.received += len(key.fileobj.recv(1 << 20))  # type: ignore[union-attr]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.conns:
            conn.close()


def _used_memory(conn: _Raw) -> int:
    """`used_memory_dataset`: Redis's memory less its own bookkeeping and buffers (the replication buffer, which
    grows with what is written once a replica is attached; client buffers, such as this driver's queries)."""
    info = conn.call("INFO", "memory")
    text = info.decode() if isinstance(info, bytes) else str(info)
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return int(fields["used_memory_dataset"])


def _measured(pid: int, work: Any) -> tuple[Any, float, float]:  # (what work returned, Redis CPU seconds, wall seconds)
    c0, w0 = cpu_seconds(pid), time.perf_counter()
    out = work()
    return out, cpu_seconds(pid) - c0, time.perf_counter() - w0


def _phase(count: int, cpu: float, wall: float, errors: int) -> dict[str, Any]:
    return {
        "publishes": count,
        "errors": errors,
        "redis_cpu_s": cpu,
        "wall_s": wall,
        "publishes_per_s": _over(count, wall),
        "publishes_per_redis_cpu_s": _over(count, cpu),
        "redis_cpu_util": _over(cpu, wall),
        "redis_cpu_us_per_publish": cpu / count * 1e6 if count else None,
    }


def raw_ceiling(
    commands: list[bytes],
    broadcast_command: bytes,
    broadcast_channel: str,
    port: int,
    pid: int,
    cap: int,
    seconds: float,
    subscribers: int,
) -> dict[str, Any]:
    """The phases described in the module's docstring, against the redis-server on `port` (process `pid`),
    which must be fresh. `commands`: one publish per stream; `seconds` bounds each timed phase."""
    from service.broker.redis import scripts

    conn = _Raw(port)
    try:
        conn.call("SCRIPT", "LOAD", scripts.PUBLISH)
        streams = len(commands)
        batch = b"".join(commands)
        far = time.monotonic() + 600
        out: dict[str, Any] = {"streams": streams, "history_cap": cap, "command_bytes": len(commands[0])}
        mem0 = _used_memory(conn)
        answered, errors = conn.pipelined(batch, streams, 1, far)
        mem1 = _used_memory(conn)
        out["memory_per_stream_with_first_entry"] = (mem1 - mem0) / streams
        # Below the cap: entries 2 .. cap/2 of every stream, at most `seconds`.
        half = max(1, cap // 2 - 1)
        (answered, errors), cpu, wall = _measured(
            pid, lambda: conn.pipelined(batch, streams, half, time.monotonic() + seconds)
        )
        out["below_cap"] = _phase(answered, cpu, wall, errors)
        mem2 = _used_memory(conn)
        out["memory_per_entry"] = (mem2 - mem1) / answered if answered else None
        filled = 1 + answered // streams
        conn.pipelined(batch, streams, max(0, cap - filled), far)  # up to the cap, not timed
        # At the cap: every publish also drops the oldest entry (XRANGE, XSETID, trim).
        (answered, errors), cpu, wall = _measured(
            pid, lambda: conn.pipelined(batch, streams, cap, time.monotonic() + seconds)
        )
        out["at_cap"] = _phase(answered, cpu, wall, errors)
        out["memory_per_full_stream"] = (_used_memory(conn) - mem0) / streams
        # The broadcast stream, one publish at a time: alone, then with subscriber connections.
        (count, errors), cpu, wall = _measured(pid, lambda: conn.one_at_a_time(broadcast_command, seconds / 2))
        out["broadcast_alone"] = _phase(count, cpu, wall, errors)
        subs = _Subscribers(port, broadcast_channel, subscribers)
        try:
            (count, errors), cpu, wall = _measured(pid, lambda: conn.one_at_a_time(broadcast_command, seconds / 2))
        finally:
            subs.close()
        out["broadcast_subscribed"] = {**_phase(count, cpu, wall, errors), "subscribers": subscribers}
        alone, subscribed = out["broadcast_alone"], out["broadcast_subscribed"]
        if alone["redis_cpu_us_per_publish"] is not None and subscribed["redis_cpu_us_per_publish"] is not None:
            extra = subscribed["redis_cpu_us_per_publish"] - alone["redis_cpu_us_per_publish"]
            out["redis_cpu_us_per_subscriber"] = extra / subscribers
        return out
    finally:
        conn.close()


async def run_raw(plan: Any) -> dict[str, Any]:
    """raw_ceiling on a fresh redis-server of its own."""
    server = RedisServer()
    server.start()
    try:
        assert server.proc is not None
        prefix = f"c{uuid.uuid4().hex[:6]}"
        streams = [f"u:raw{i}" for i in range(plan.capacity_raw_streams)]
        commands = await publish_commands(server.url, prefix, streams)
        (broadcast,) = await publish_commands(server.url, prefix, ["b"])
        return await asyncio.to_thread(
            raw_ceiling,
            commands,
            broadcast,
            f"{prefix}:{{b}}:c",
            server.port,
            server.proc.pid,
            history_size(),
            plan.capacity_raw_seconds,
            plan.capacity_subscribers,
        )
    finally:
        server.stop()


# ---- one Redis, or a Redis Cluster, under the service


class Brokers:
    """The Redis a mode runs on, as the service's `NOTIFY_REDIS_URL` names it: one redis-server (`single`),
    or a Redis Cluster of three primaries with a replica each (`cluster`). CPU is read per process, the
    primaries' summed apart from the replicas'."""

    def __init__(self, mode: str) -> None:
        from tests.topology import ClusterTopology

        assert mode in MODES, mode
        self.mode = mode
        self.single = RedisServer() if mode == "single" else None
        self.cluster = ClusterTopology(3) if mode == "cluster" else None
        self.primaries: list[tuple[int, int]] = []  # (port, pid)
        self.replicas: list[tuple[int, int]] = []
        self._slots: list[int] = []  # slot -> the port of its primary

    @property
    def url(self) -> str:
        return self.single.url if self.single is not None else self.cluster.url  # type: ignore[union-attr]

    @property
    def proc(self) -> Any:  # Deployment.redis_cpu reads it; redis_cpu is overridden below
        return None

    def start(self) -> None:
        if self.single is not None:
            self.single.start()
            assert self.single.proc is not None
            self.primaries = [(self.single.port, self.single.proc.pid)]
            return
        assert self.cluster is not None
        self.cluster.start()
        for node in self.cluster.nodes:
            assert node.proc is not None
            (self.primaries if node.role() == "master" else self.replicas).append((node.port, node.proc.pid))
        self._slots = [0] * 16384
        for start, end, primary, *_ in self.cluster.nodes[0].call("CLUSTER", "SLOTS"):
            self._slots[int(start) : int(end) + 1] = [int(primary[1])] * (int(end) - int(start) + 1)

    def stop(self) -> None:
        if self.single is not None:
            self.single.stop()
        if self.cluster is not None:
            self.cluster.stop()

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: (primaries summed, replicas summed)."""
        return (sum(cpu_seconds(pid) for _, pid in self.primaries), sum(cpu_seconds(pid) for _, pid in self.replicas))

    def used_memory(self) -> int:
        """`used_memory` of the primaries, summed."""
        total = 0
        for port, _ in self.primaries:
            conn = _Raw(port)
            try:
                total += _used_memory(conn)
            finally:
                conn.close()
        return total

    def port_of(self, key: str) -> int:
        if self.single is not None:
            return self.single.port
        from redis.crc import key_slot

        return self._slots[key_slot(key.encode())]

    def fill(self, commands: list[bytes], keys: list[str], times: int, seconds: float = 600.0) -> int:
        """Send each command `times` times to the primary that owns its key, pipelined, one primary after the
        other, at most `seconds` on each; the publishes answered."""
        by_port: dict[int, list[bytes]] = {}
        for cmd, key in zip(commands, keys, strict=True):
            by_port.setdefault(self.port_of(key), []).append(cmd)
        from service.broker.redis import scripts

        done = 0
        for port, cmds in by_port.items():
            conn = _Raw(port)
            try:
                conn.call("SCRIPT", "LOAD", scripts.PUBLISH)
                answered, errors = conn.pipelined(b"".join(cmds), len(cmds), times, time.monotonic() + seconds)
                if errors:
                    raise RuntimeError(f"{errors} publishes of the driver failed on port {port}")
                done += answered
            finally:
                conn.close()
        return done


class ModeDeployment(Deployment):
    """Deployment's interface (CpuWindow, W.connect and W.targeted read it) over `Brokers`: one replica of
    the service, its Redis CPU being the primaries' (the replicas' is read apart)."""

    def __init__(self, system: System, brokers: Brokers) -> None:
        super().__init__(system, embedded=True)  # no RedisServer of its own: `brokers` stands there
        self.redis = brokers  # type: ignore[assignment]
        self.brokers = brokers

    def redis_cpu(self) -> float:
        return self.brokers.cpu()[0]


async def run_mode(system: System, mode: str, plan: Any, settle: float = 2.0, idle_s: float = 1.0) -> dict[str, Any]:
    """One service replica on `mode`'s Redis: every user's history filled to its cap (a publish then costs
    what it costs in a steady state: it also drops the oldest entry), the sockets connected, then
    `POST /notify/{user}` at `plan.capacity_rate` for `plan.duration` seconds."""
    brokers = Brokers(mode)
    # Every socket connects as fast as the harness opens them (a handshake-rate cap, where the service has one,
    # would refuse a share of them; this session weighs publishes, not connects).
    system = dataclasses.replace(system, env={**system.env, "NOTIFY_MAX_HANDSHAKE_RATE": "off"})
    with ModeDeployment(system, brokers) as dep:
        out: dict[str, Any] = {"mode": mode, "primaries": len(brokers.primaries), "replicas": len(brokers.replicas)}
        streams = [f"u:u{i}" for i in range(plan.users)]
        keys = [f"{dep.namespace}:{{{s}}}:h" for s in streams]
        commands = await publish_commands(brokers.url, dep.namespace, streams)
        mem0 = brokers.used_memory()
        out["history_filled"] = await asyncio.to_thread(brokers.fill, commands, keys, history_size())
        mem1 = brokers.used_memory()
        out["redis_memory_per_full_stream"] = (mem1 - mem0) / len(streams)
        # The same commands pipelined, every stream at its cap: what a publish costs these primaries when
        # they are kept busy (many per read), against what it costs at the service's rate below.
        c0, w0 = brokers.cpu(), time.perf_counter()
        seconds = plan.capacity_raw_seconds / len(brokers.primaries)
        count = await asyncio.to_thread(brokers.fill, commands, keys, history_size(), seconds)
        c1, wall = brokers.cpu(), time.perf_counter() - w0
        out["pipelined_at_cap"] = {
            **_phase(count, c1[0] - c0[0], wall, 0),
            "replicas_cpu_us_per_publish": (c1[1] - c0[1]) / count * 1e6 if count and brokers.replicas else None,
        }
        mem1 = brokers.used_memory()
        fleet = Fleet(system.kind, plan.users)
        port = dep.replicas[0].port
        out["connect"] = await W.connect(dep, fleet, lambda i: port, plan.concurrency, settle=settle)
        sockets = out["connect"]["sockets"]
        out["redis_memory_per_socket"] = (brokers.used_memory() - mem1) / sockets if sockets else None
        pub = Publisher(port, W.publisher_token())
        await pub.open(16)
        try:
            if plan.warmup:
                await W.targeted(dep, fleet, pub, 200, 1.0, plan.drain)
            # What the redis-servers spend with nothing asked of them (cluster gossip, the service's probes
            # and presence beats): it is inside the measured window too.
            idle = CpuWindow(dep).start()
            r0 = brokers.cpu()
            await asyncio.sleep(idle_s)
            r1 = brokers.cpu()
            idle.stop()
            out["idle_primaries_cpu_util"] = _over(r1[0] - r0[0], idle.wall)
            out["idle_replicas_cpu_util"] = _over(r1[1] - r0[1], idle.wall)
            out["idle_server_cpu_util"] = _over(idle.server, idle.wall)
            from .bench import _Profiler  # with --profile: py-spy on the service during the step

            prof = _Profiler(plan.profile_dir, f"capacity-{mode}", dep.replicas[0].pid, plan.duration)
            before = brokers.cpu()
            step = await W.targeted(dep, fleet, pub, plan.capacity_rate, plan.duration, plan.drain)
            after = brokers.cpu()
            prof.wait()
        finally:
            pub.close()
            await fleet.close_all()
        primaries_cpu, replicas_cpu = step["redis_cpu_s"], after[1] - before[1]
        accepted = step["accepted"]
        idle_cpu = (out["idle_primaries_cpu_util"] or 0.0) * step["wall_s"]
        out["step"] = step
        out |= {
            "publishes": accepted,
            "primaries_cpu_s": primaries_cpu,
            "replicas_cpu_s": replicas_cpu,
            "primaries_cpu_util": _over(primaries_cpu, step["wall_s"]),
            "publishes_per_redis_cpu_s": _over(accepted, primaries_cpu),
            "publishes_per_redis_cpu_s_net_of_idle": _over(accepted, primaries_cpu - idle_cpu),
            "redis_cpu_us_per_publish": primaries_cpu / accepted * 1e6 if accepted else None,
            "replicas_cpu_us_per_publish": replicas_cpu / accepted * 1e6 if accepted and brokers.replicas else None,
            "deliveries_per_cpu_s": step["deliveries_per_cpu_s"],
            "server_cpu_us_per_publish": step["server_cpu_s"] / accepted * 1e6 if accepted else None,
        }
        return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def run_capacity(system: System, plan: Any, round_index: int = 0) -> dict[str, Any]:
    """The raw ceiling, then the two modes, which first alternating by round."""
    raw = await run_raw(plan)
    out: dict[str, Any] = {"raw": raw}
    _log(
        f"  raw publish script, {raw['streams']} streams: {_n(raw['below_cap']['publishes_per_redis_cpu_s'])} "
        f"per Redis CPU-s below the history cap, {_n(raw['at_cap']['publishes_per_redis_cpu_s'])} at it "
        f"({_n(raw['at_cap']['publishes_per_s'])}/s, Redis at {_pct(raw['at_cap']['redis_cpu_util'])}); "
        f"{_n(raw['memory_per_full_stream'])} B per full stream; broadcast one at a time "
        f"{_n(raw['broadcast_alone']['redis_cpu_us_per_publish'], 1)} us of Redis CPU, "
        f"+{_n(raw.get('redis_cpu_us_per_subscriber'), 2)} us per subscriber"
    )
    order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
    out["order"] = order
    for mode in order:
        m = out[mode] = await run_mode(system, mode, plan)
        step = m["step"]
        _log(
            f"  {system.name} on {mode} Redis, {plan.capacity_rate:g} POST/s: {_n(m['publishes_per_redis_cpu_s'])} "
            f"publishes per Redis CPU-s (primaries; replicas {_n(m['replicas_cpu_us_per_publish'], 1)} us each), "
            f"pipelined at the cap {_n(m['pipelined_at_cap']['publishes_per_redis_cpu_s'])}; service "
            f"{_n(m['deliveries_per_cpu_s'])} deliveries per CPU-s, p99 {_n(step['p99_ms'], 1)} ms, "
            f"lost {step['lost']}, errors {step['http_errors']}"
        )
    single, cluster = out["single"], out["cluster"]
    out["cluster_vs_single"] = {
        "publishes_per_redis_cpu_s": _over(cluster["publishes_per_redis_cpu_s"], single["publishes_per_redis_cpu_s"]),
        "pipelined_at_cap": _over(
            cluster["pipelined_at_cap"]["publishes_per_redis_cpu_s"],
            single["pipelined_at_cap"]["publishes_per_redis_cpu_s"],
        ),
        "deliveries_per_cpu_s": _over(cluster["deliveries_per_cpu_s"], single["deliveries_per_cpu_s"]),
    }
    ratio = out["cluster_vs_single"]
    _log(
        f"  cluster / single: publishes per Redis CPU-s {_n(ratio['publishes_per_redis_cpu_s'], 2)}x "
        f"(pipelined {_n(ratio['pipelined_at_cap'], 2)}x), service deliveries per CPU-s "
        f"{_n(ratio['deliveries_per_cpu_s'], 3)}x"
    )
    return out


def _n(value: Any, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


_RAW = {
    "below_cap_per_redis_cpu_s": ("below_cap", "publishes_per_redis_cpu_s"),
    "at_cap_per_redis_cpu_s": ("at_cap", "publishes_per_redis_cpu_s"),
    "at_cap_per_s": ("at_cap", "publishes_per_s"),
    "at_cap_redis_cpu_util": ("at_cap", "redis_cpu_util"),
    "at_cap_us_per_publish": ("at_cap", "redis_cpu_us_per_publish"),
    "below_cap_us_per_publish": ("below_cap", "redis_cpu_us_per_publish"),
    "broadcast_alone_us_per_publish": ("broadcast_alone", "redis_cpu_us_per_publish"),
    "broadcast_subscribed_us_per_publish": ("broadcast_subscribed", "redis_cpu_us_per_publish"),
}
_RAW_FLAT = (
    "memory_per_stream_with_first_entry",
    "memory_per_entry",
    "memory_per_full_stream",
    "redis_cpu_us_per_subscriber",
    "command_bytes",
    "streams",
    "history_cap",
)
_MODE = (
    "publishes_per_redis_cpu_s",
    "publishes_per_redis_cpu_s_net_of_idle",
    "redis_cpu_us_per_publish",
    "replicas_cpu_us_per_publish",
    "primaries_cpu_util",
    "idle_primaries_cpu_util",
    "idle_replicas_cpu_util",
    "deliveries_per_cpu_s",
    "server_cpu_us_per_publish",
    "redis_memory_per_full_stream",
    "redis_memory_per_socket",
    "primaries",
    "replicas",
)
_STEP = ("publish_rate", "delivered_per_s", "p50_ms", "p99_ms", "server_cpu_util", "lost", "duplicates", "http_errors")


def summarize_capacity(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds; each cluster-to-single ratio is taken within its round (same invocation,
    back to back) before the median, and kept per round too."""
    out: dict[str, Any] = {"runs": len(sessions)}
    raws = [s["raw"] for s in sessions]
    out["raw"] = {key: _median([r[a][b] for r in raws]) for key, (a, b) in _RAW.items()}
    out["raw"] |= {key: _median([r.get(key) for r in raws]) for key in _RAW_FLAT}
    out["raw"]["subscribers"] = raws[0]["broadcast_subscribed"]["subscribers"] if raws else None
    for mode in MODES:
        runs = [s[mode] for s in sessions if mode in s]
        m = {key: _median([r.get(key) for r in runs]) for key in _MODE}
        m |= {key: _median([r["step"].get(key) for r in runs]) for key in _STEP}
        m["rate"] = runs[0]["step"]["rate"] if runs else None
        m["sockets"] = _median([r["connect"]["sockets"] for r in runs])
        m["pipelined_at_cap_per_redis_cpu_s"] = _median(
            [r["pipelined_at_cap"]["publishes_per_redis_cpu_s"] for r in runs]
        )
        m["pipelined_at_cap_replicas_us_per_publish"] = _median(
            [r["pipelined_at_cap"]["replicas_cpu_us_per_publish"] for r in runs]
        )
        m["lost_total"] = sum(r["step"]["lost"] for r in runs)
        m["duplicates_total"] = sum(r["step"]["duplicates"] for r in runs)
        m["http_errors_total"] = sum(r["step"]["http_errors"] for r in runs)
        out[mode] = m
    ratios = [s["cluster_vs_single"] for s in sessions]
    out["cluster_vs_single"] = {key: _median([r[key] for r in ratios]) for key in ratios[0]} if ratios else {}
    out["cluster_vs_single_per_round"] = ratios
    out["orders"] = [s["order"] for s in sessions]
    return out
