"""What the default logging costs: targeted publishes per server CPU-second, defaults against tuned.

    python -m tests.load.logcost [--rate 1000] [--seconds 2] [--rounds 15] [--users 1000]
                                 [--connections 10] [--modes default,tuned] [--profile DIR]
                                 [--out docs/bench/logcost.md]
                                 [--baseline-tree DIR]

One Redis and one replica per mode, each with its own sockets (`--users` users, two sockets each)
and its stdout to a file, as a container's log would be. Modes: `default` (what the README runs:
`python -m service` with only the secret, the Redis URL and a key prefix set, so log level info
and the access log's `summary`), `tuned` (NOTIFY_LOG_LEVEL=warning, NOTIFY_ACCESS_LOG=off), and
the access log's modes at level info: `summary` (the same as `default`), `off`, `all` (a line per
request). A mode named twice gets two replicas, to show the noise between twins. Short rounds
alternate between the modes (the order rotates every round), each publishing `--rate` POST
/notify/{user} a second over `--connections` keep-alive connections for `--seconds` to one
replica and waiting for every delivery. The figures are medians over the rounds: deliveries and
publishes per CPU-second of that replica (its threads' schedstat, in nanoseconds), and each
mode against the reference (`tuned` if it runs, else `off`): its deliveries per CPU-second / the
reference's in the same round (rounds are paired, so that the machine's drift cancels), the
median ratio with the lowest and highest round.
`--profile DIR`: py-spy (root) records each replica through the middle round, as raw collapsed
stacks in DIR/<mode>.txt (`python -m tests.load.profile_top` summarizes them).
`--baseline-tree DIR`: also run the replica of another checkout (say `git archive HEAD | tar -x -C
DIR`) with its default and with NOTIFY_ACCESS_LOG=false.
"""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.utils import RedisServer, token

from .bench import _Profiler
from .clients import Fleet, Publisher, paced, perf
from .procs import Server, System

# Environment of a replica by mode, on top of the secret and Redis that every replica gets.
_MODES = {
    "default": {},
    "tuned": {"NOTIFY_LOG_LEVEL": "warning", "NOTIFY_ACCESS_LOG": "off"},
    "summary": {},
    "off": {"NOTIFY_ACCESS_LOG": "off"},
    "all": {"NOTIFY_ACCESS_LOG": "all"},
}


@dataclass
class Mode:
    label: str
    env: dict[str, str]
    tree: str | None = None
    server: Server | None = None
    fleet: Fleet | None = None
    pub: Publisher | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, to the nanosecond (schedstat), not to the clock tick."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    low, _, high = statistics.quantiles(values, n=4)
    return f"{low:.3f}-{high:.3f}"


async def _round(mode: Mode, rate: float, seconds: float, drain: float) -> dict[str, Any]:
    assert mode.server is not None and mode.fleet is not None and mode.pub is not None
    server, fleet, pub = mode.server, mode.fleet, mode.pub
    count = int(rate * seconds)
    rec = fleet.recorder
    run = rec.reset(count, 0)
    rng = random.Random(count)
    for i in range(count):
        rec.user_of[i] = rng.randrange(fleet.users)
    accepted = 0
    statuses: dict[int, int] = {}

    def fire(i: int, t: float) -> None:
        def done(status: int, body: bytes) -> None:
            nonlocal accepted
            statuses[status] = statuses.get(status, 0) + 1
            accepted += 200 <= status < 300

        body = orjson.dumps({"event": "cost", "data": {"t": t, "k": i, "r": run}})
        pub.request(f"/notify/u{rec.user_of[i]}", body, done)

    log_before = server.log.stat().st_size
    cpu0, wall0 = cpu_seconds(server.pid), perf()
    await paced(rate, count, fire, seconds + 30)
    await pub.drained(drain)
    deadline = perf() + drain
    while rec.received < 2 * accepted and perf() < deadline:
        await asyncio.sleep(0.01)
    cpu, wall = cpu_seconds(server.pid) - cpu0, perf() - wall0
    latency = [x * 1000 for x in rec.latency]
    return {
        "publishes": accepted,
        "errors": count - accepted,
        "statuses": statuses,  # by HTTP status; what is missing from `count` was not answered in time
        "delivered": rec.received,
        "lost": 2 * accepted - rec.received,
        "server_cpu_s": cpu,
        "server_cpu_util": cpu / wall,
        "publishes_per_cpu_s": accepted / cpu if cpu else 0.0,
        "deliveries_per_cpu_s": rec.received / cpu if cpu else 0.0,
        "p50_ms": _percentile(latency, 0.5),
        "p99_ms": _percentile(latency, 0.99),
        "log_bytes": server.log.stat().st_size - log_before,
    }


def _summary(ns: argparse.Namespace, modes: list[Mode], reference: str) -> list[str]:
    """The run's table, in Markdown: medians over the rounds, each mode against the reference."""

    def median(mode: Mode, key: str) -> float:
        return statistics.median(r[key] for r in mode.rounds)

    ref = next(m for m in modes if m.label == reference)
    lines = [
        f"{ns.rate:,.0f} POST /notify/{{user}} per second for {ns.seconds:g} s over {ns.connections} keep-alive "
        f"connections, {2 * ns.users:,} sockets over {ns.users:,} users per replica, {ns.rounds} rounds per mode "
        f"alternating (order rotated each round), medians. Ratio: deliveries per CPU-s / {reference}'s in the same "
        "round: the median over the rounds, its interquartile range and, in brackets, the lowest and highest round.",
        "",
        f"| mode | publishes per CPU-s | deliveries per CPU-s | ratio to {reference} | server CPU | p99 ms [range] "
        "| log per round |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in modes:
        ratios = [
            mine["deliveries_per_cpu_s"] / theirs["deliveries_per_cpu_s"]
            for mine, theirs in zip(mode.rounds, ref.rounds, strict=True)
        ]
        p99 = [r["p99_ms"] for r in mode.rounds]
        lines.append(
            f"| {mode.label} | {median(mode, 'publishes_per_cpu_s'):,.0f} | "
            f"{median(mode, 'deliveries_per_cpu_s'):,.0f} | "
            f"{statistics.median(ratios):.3f}, IQR {_quartiles(ratios)} [{min(ratios):.3f}, {max(ratios):.3f}] | "
            f"{median(mode, 'server_cpu_util'):.0%} | {median(mode, 'p99_ms'):.1f} [{min(p99):.1f}, {max(p99):.1f}] | "
            f"{median(mode, 'log_bytes') / 1024:,.0f} KB |"
        )
    lost = sum(r["lost"] + r["errors"] for m in modes for r in m.rounds)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines += [
        "",
        f"Lost deliveries and failed publishes over every round: {lost}. Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, load average at the end {load}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
    ]
    return lines


def _save(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="POST /notify/{user} per second (1000)")
    parser.add_argument("--seconds", type=float, default=2.0, help="each round's publishing time (2)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of every mode (15)")
    parser.add_argument("--users", type=int, default=1000, help="users per replica, two sockets each (1000)")
    parser.add_argument("--connections", type=int, default=10, help="the publisher's keep-alive connections (10)")
    parser.add_argument(
        "--modes",
        default="default,tuned",
        help=f"of {', '.join(_MODES)}; one replica each (a mode twice: two replicas, to see the noise between them)",
    )
    parser.add_argument("--profile", help="py-spy each replica through the middle round into this directory")
    parser.add_argument("--out", help="also write the table to this Markdown file (make bench's report includes it)")
    parser.add_argument(
        "--baseline-tree", type=os.path.realpath, help="another checkout: its default and NOTIFY_ACCESS_LOG=false too"
    )
    ns = parser.parse_args(argv)

    modes: list[Mode] = []
    for name in ns.modes.split(","):
        if name not in _MODES:
            parser.error(f"unknown mode {name!r}: one of {', '.join(_MODES)}")
        label = name if name not in [m.label.split("#")[0] for m in modes] else f"{name}#{len(modes) + 1}"
        modes.append(Mode(label, _MODES[name]))
    reference = next((name for name in ("tuned", "off") if any(m.label == name for m in modes)), None)
    if reference is None:
        parser.error("--modes must include tuned or off, the reference")
    if ns.baseline_tree:
        tree = ns.baseline_tree
        modes += [Mode("baseline default", {}, tree), Mode("baseline false", {"NOTIFY_ACCESS_LOG": "false"}, tree)]
    redis = RedisServer()
    redis.start()
    bearer = token("logcost-publisher", "notify:publish", ttl=3600)
    try:
        for mode in modes:
            system = System(
                mode.label,
                "notify",
                variant={"tree": mode.tree} if mode.tree else {},
                env={"NOTIFY_LOG_LEVEL": "info", **mode.env},  # the replica's own default, over the bench's
            )
            mode.server = system.replica(redis, f"c{uuid.uuid4().hex[:8]}").start()
            mode.fleet = Fleet("notify", ns.users)
            tokens = [token(f"u{i >> 1}", ttl=3600) for i in range(2 * ns.users)]
            port = mode.server.port
            seconds, failures = await mode.fleet.connect_all(lambda i, p=port: p, tokens, 50, 30.0)
            if failures:
                raise RuntimeError(f"{mode.label}: {failures} sockets failed to connect")
            mode.pub = Publisher(port, bearer)
            await mode.pub.open(ns.connections)
            print(f"{mode.label}: replica on port {port}, {2 * ns.users} sockets in {seconds:.1f} s", flush=True)
        for mode in modes:  # warm-up: every replica has run the publish path before anything is measured
            await _round(mode, min(ns.rate, 500.0), 1.0, 5.0)
        for r in range(ns.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            for mode in order:
                profiling = ns.profile is not None and r == ns.rounds // 2
                assert mode.server is not None
                prof = _Profiler(ns.profile if profiling else None, mode.label, mode.server.pid, ns.seconds)
                result = await _round(mode, ns.rate, ns.seconds, 5.0)
                prof.wait()
                mode.rounds.append(result)
                print(
                    f"round {r + 1} {mode.label:>18}: {result['publishes_per_cpu_s']:,.0f} publishes and "
                    f"{result['deliveries_per_cpu_s']:,.0f} deliveries per CPU-s, CPU {result['server_cpu_util']:.0%}, "
                    f"p99 {result['p99_ms']:.1f} ms, log {result['log_bytes'] / 1024:,.0f} KB, "
                    f"lost {result['lost']}, errors {result['errors']}"
                    + (f" (answers {result['statuses']})" if result["errors"] else ""),
                    flush=True,
                )
    finally:
        for mode in modes:
            if mode.fleet is not None:
                await mode.fleet.close_all()
            if mode.pub is not None:
                mode.pub.close()
            if mode.server is not None:
                mode.server.stop()
        redis.stop()

    report = _summary(ns, modes, reference)
    print("\n" + "\n".join(report))
    if ns.out:
        _save(Path(ns.out), report)
    return 0


if __name__ == "__main__":
    import uvloop

    raise SystemExit(uvloop.run(main()))
