"""Idle memory per socket, one checkout of the service against another in one invocation.

    python -m tests.load.idlemem --tree base=/path/to/old/checkout --tree new=. [--rounds 3] [--sockets 2000]

Each run is a real replica as production starts it (`python -m service`, with NOTIFY_JWT_SECRET and
NOTIFY_REDIS_URL and no other setting, its log in a file) on a redis-server of its own; this process
opens the sockets (two per user, each with a token of its own) and reads the replica's RSS before and
after, as the benchmark's connect step does (`workloads.connect`). Trees alternate, their order
reversed every other round, because the machine's state drifts; the figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from tests.utils import SECRET, RedisServer

from . import workloads as W
from .clients import Fleet
from .procs import Server, cpu_seconds, cpu_split, rss_bytes


class _Replica:
    """One service replica on its own Redis, with what `workloads.connect` reads of a deployment."""

    def __init__(self, tree: Path) -> None:
        self.redis = RedisServer()
        self.tree = tree
        self.server: Server | None = None

    def __enter__(self) -> _Replica:
        self.redis.start()
        # Nothing of this process's own NOTIFY_ settings reaches the replica: only these two.
        for name in [n for n in os.environ if n.startswith("NOTIFY_")]:
            del os.environ[name]
        env = {"NOTIFY_JWT_SECRET": SECRET, "NOTIFY_REDIS_URL": self.redis.url}
        argv = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "{port}"]
        self.server = Server(argv, env, "/readyz", cwd=self.tree).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.stop()
        self.redis.stop()

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def rss(self) -> int:
        assert self.server is not None
        return rss_bytes(self.server.pid)

    def server_cpu(self) -> float:
        assert self.server is not None
        return cpu_seconds(self.server.pid)

    def server_cpu_split(self) -> tuple[float, float]:
        """(all, the kernel's part) of the replica's CPU seconds, as `Deployment` gives them."""
        assert self.server is not None
        user, kernel = cpu_split(self.server.pid)
        return user + kernel, kernel

    def redis_cpu(self) -> float:
        return cpu_seconds(self.redis.proc.pid) if self.redis.proc is not None else 0.0


async def measure(tree: Path, sockets: int, concurrency: int, settle: float) -> dict[str, Any]:
    with _Replica(tree) as replica:
        fleet = Fleet("notify", sockets // 2)
        try:
            out = await W.connect(replica, fleet, lambda _: replica.port, concurrency, settle=settle)  # type: ignore[arg-type]
        finally:
            await fleet.close_all()
    return out


async def main_async(ns: argparse.Namespace, trees: list[tuple[str, Path]]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    for round_ in range(ns.rounds):
        for name, tree in trees if round_ % 2 == 0 else trees[::-1]:
            out = await measure(tree, ns.sockets, ns.concurrency, ns.settle)
            runs[name].append(out)
            print(
                f"round {round_ + 1} {name}: {out['sockets']} sockets ({out['connect_failures']} failed), "
                f"{out['rss_kb_per_socket']:.2f} KB/socket, base {out['rss_base_mb']:.1f} MB",
                flush=True,
            )
    summary = {
        name: {
            "kb_per_socket": [round(r["rss_kb_per_socket"], 2) for r in rs],
            "median_kb_per_socket": round(statistics.median(r["rss_kb_per_socket"] for r in rs), 2),
            "median_base_mb": round(statistics.median(r["rss_base_mb"] for r in rs), 1),
        }
        for name, rs in runs.items()
    }
    for name, s in summary.items():
        print(f"{name}: median {s['median_kb_per_socket']} KB/socket (rounds {s['kb_per_socket']})")
    return {"sockets": ns.sockets, "rounds": ns.rounds, "summary": summary, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.idlemem", description=__doc__)
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=DIR", help="a checkout to measure")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sockets", type=int, default=2000, help="two per user")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight")
    parser.add_argument("--settle", type=float, default=4.0, help="seconds idle before RSS is read")
    parser.add_argument("--json", default=None, help="write every run's figures here")
    ns = parser.parse_args(argv)
    trees = [(name, Path(path).resolve()) for name, _, path in (t.partition("=") for t in ns.tree)]
    result = asyncio.run(main_async(ns, trees))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
