"""Where an idle socket's memory goes: tracemalloc snapshots of a real replica around N idle sockets.

    python -m tests.load.idleprofile [--sockets 2000] [--top 40] [--out DIR]

The replica is the service as `python -m service` builds it, on a redis-server of its own, with
tracemalloc started before anything is imported; on SIGUSR1 it collects garbage and writes a snapshot
and a census of objects by type (count and `sys.getsizeof`) to DIR. This process takes one snapshot,
opens the sockets (two per user, a token each), lets them idle, takes another, and prints what was
added per socket: by line of allocation, by allocation traceback (`--tracebacks`), and by type.
Figures are Python's own allocations; RSS (`tests.load.idlemem`) adds the allocator's overhead.
"""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import pickle
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path

from tests.utils import SECRET, RedisServer

from . import workloads as W
from .clients import Fleet
from .procs import ROOT, Server


def serve(port: int, out: Path) -> None:
    """The replica's side: tracemalloc first, a snapshot on each SIGUSR1, then the service."""
    tracemalloc.start(12)
    taken = [0]

    def dump(*_: object) -> None:
        gc.collect()
        n = taken[0]
        taken[0] += 1
        tracemalloc.take_snapshot().dump(str(out / f"snap{n}.bin"))
        counts: collections.Counter[str] = collections.Counter()
        sizes: collections.Counter[str] = collections.Counter()
        for obj in gc.get_objects():
            kind = type(obj)
            name = f"{kind.__module__}.{kind.__qualname__}"
            if kind.__name__ in ("coroutine", "generator"):
                name += f" {obj.__qualname__}"
            counts[name] += 1
            sizes[name] += sys.getsizeof(obj)
        with open(out / f"census{n}.pkl", "wb") as f:
            pickle.dump((counts, sizes), f)
        (out / f"done{n}").write_text("ok")

    signal.signal(signal.SIGUSR1, dump)
    from service.config.settings import Settings
    from service.server.runner import build_server

    build_server(Settings(), "127.0.0.1", port).run()


async def drive(sockets: int, out: Path, concurrency: int) -> None:
    redis = RedisServer()
    redis.start()
    for name in [n for n in os.environ if n.startswith("NOTIFY_")]:
        del os.environ[name]
    env = {"NOTIFY_JWT_SECRET": SECRET, "NOTIFY_REDIS_URL": redis.url}
    argv = [sys.executable, "-m", "tests.load.idleprofile", "--serve", "{port}", "--out", str(out)]
    server = Server(argv, env, "/readyz", cwd=ROOT).start(60)
    try:

        async def snapshot(n: int) -> None:
            os.kill(server.pid, signal.SIGUSR1)
            for _ in range(1200):
                if (out / f"done{n}").exists():
                    return
                await asyncio.sleep(0.1)
            raise TimeoutError("no snapshot from the replica")

        await asyncio.sleep(1)
        await snapshot(0)
        fleet = Fleet("notify", sockets // 2)
        _, failures = await fleet.connect_all(lambda _: server.port, W.client_tokens(sockets), concurrency, 60)
        await asyncio.sleep(4)
        await snapshot(1)
        print(f"{sockets - failures} sockets open ({failures} failed)")
        await fleet.close_all()
    finally:
        server.stop()
        redis.stop()


def report(out: Path, sockets: int, top: int, tracebacks: bool) -> None:
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before = tracemalloc.Snapshot.load(str(out / "snap0.bin")).filter_traces(ignore)
    after = tracemalloc.Snapshot.load(str(out / "snap1.bin")).filter_traces(ignore)
    total = sum(s.size_diff for s in after.compare_to(before, "filename"))
    print(f"traced: {total / sockets:.0f} B a socket")
    for stat in after.compare_to(before, "traceback" if tracebacks else "lineno")[:top]:
        frame = stat.traceback[0]
        where = f"{frame.filename}:{frame.lineno}"
        print(f"{stat.size_diff / sockets:7.0f} B {stat.count_diff / sockets:5.2f}/socket  {where}")
        if tracebacks:
            for line in stat.traceback.format()[-12:]:
                print("        " + line.strip()[:140])
    with open(out / "census0.pkl", "rb") as f:
        counts0, sizes0 = pickle.load(f)
    with open(out / "census1.pkl", "rb") as f:
        counts1, sizes1 = pickle.load(f)
    print("objects added a socket, by type (count, sys.getsizeof):")
    added = sorted(counts1, key=lambda k: sizes0.get(k, 0) - sizes1[k])
    for name in added[:top]:
        count = (counts1[name] - counts0.get(name, 0)) / sockets
        if count >= 0.3:
            print(f"{(sizes1[name] - sizes0.get(name, 0)) / sockets:7.0f} B {count:5.2f}  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.idleprofile", description=__doc__)
    parser.add_argument("--sockets", type=int, default=2000, help="two per user")
    parser.add_argument("--concurrency", type=int, default=32, help="handshakes in flight")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--tracebacks", action="store_true", help="group by allocation traceback")
    parser.add_argument("--out", default=None, help="where the snapshots go (default: a new temporary directory)")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    out = Path(ns.out or tempfile.mkdtemp(prefix="idleprofile-"))
    if ns.serve is not None:
        serve(ns.serve, out)
        return 0
    asyncio.run(drive(ns.sockets, out, ns.concurrency))
    report(out, ns.sockets, ns.top, ns.tracebacks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
