"""What connecting costs with user.online/user.offline configured:
`python -m tests.load.connects [--waves 8] [--users 500] [--today REV] [--profile DIR]`.

Every system runs one replica on its own redis-server, all started together and kept up: `none` (no
webhooks), `hooked` (an endpoint for user.online and user.offline, answered by a local receiver) and,
with `--today`, the service as git has it at REV with no webhooks. Waves alternate between the systems,
the order rotated each wave: a wave opens every socket (two per user, a token each; connects per
second, connects per server CPU-second), waits while the replica settles (its CPU then is the work the
connects left behind: presence writes, events queued and sent), then closes every socket and waits out
the leave grace (the offline events), so each wave's users come online afresh. Ratios are taken within
a wave against `none`; medians and ranges over the waves.
"""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC110

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.receiver import new_secret

from . import workloads as W
from .clients import Fleet
from .procs import CpuWindow, Deployment, System
from .webhooks import Receiver, exported


async def wave(dep: Deployment, users: int, settle: float) -> dict[str, Any]:
    fleet = Fleet("notify", users)
    tokens = W.client_tokens(users * 2)
    port = dep.replicas[0].port
    window = CpuWindow(dep).start()
    seconds, failures = await fleet.connect_all(lambda _i: port, tokens, 100, 30.0)
    window.stop()
    after = CpuWindow(dep).start()
    await asyncio.sleep(settle)
    after.stop()
    opened = users * 2 - failures
    await fleet.close_all()
    return {
        "connects_per_s": opened / seconds,
        "connects_per_cpu_s": opened / window.server if window.server else None,
        # The connects' whole cost: their window and what they left to do after it.
        "cpu_us_per_connect": (window.server + after.server) / opened * 1e6 if opened else None,
        "redis_cpu_us_per_connect": (window.redis + after.redis) / opened * 1e6 if opened else None,
        "failures": failures,
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _profilers(deps: dict[str, Deployment], profile: Path) -> list[subprocess.Popen[bytes]]:
    """A py-spy per replica, sampling until told to stop (SIGINT), into `profile/<name>.txt`."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [
        subprocess.Popen(
            [spy, "record", "--format", "raw", "-r", "250", "-p", str(dep.replicas[0].pid)]
            + ["-o", str(profile / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, dep in deps.items()
    ]


async def run(systems: list[System], waves: int, users: int, settle: float, profile: Path | None) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        deps = {s.name: stack.enter_context(Deployment(s)) for s in systems}
        spies = _profilers(deps, profile) if profile is not None else []
        await asyncio.sleep(2.0)
        try:
            for w in range(waves):
                got: dict[str, Any] = {}
                names = list(deps)
                for name in names[w % len(names) :] + names[: w % len(names)]:
                    got[name] = await wave(deps[name], users, settle)
                    await asyncio.sleep(4.0)  # past the leave grace: every user offline again
                print(json.dumps({"wave": w + 1, **got}), file=sys.stderr, flush=True)
                out.append(got)
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
            for spy in spies:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    spy.wait(30)
    summary: dict[str, Any] = {}
    for name in deps:
        for key in ("connects_per_s", "connects_per_cpu_s", "cpu_us_per_connect", "redis_cpu_us_per_connect"):
            summary[f"{name} {key}"] = _spread([r[name][key] for r in out])
            if name != "none":
                summary[f"{name}/none {key}"] = _spread([r[name][key] / r["none"][key] for r in out])
    summary["failures"] = sum(r[n]["failures"] for r in out for n in deps)
    summary["events"] = Receiver.count
    summary["load"] = os.getloadavg()
    return summary


async def main_async(ns: argparse.Namespace, today: Path | None) -> dict[str, Any]:
    server = await asyncio.get_running_loop().create_server(Receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    hooks = [{"url": url, "secret": new_secret(), "events": ["user.online", "user.offline"]}]
    systems = [System("none", "notify"), System("hooked", "notify", env={"NOTIFY_WEBHOOKS": json.dumps(hooks)})]
    if today is not None:
        systems.append(System("today", "notify", {"tree": str(today)}))
    for also in ns.hooked_tree or ():
        name, _, tree = also.partition("=")
        systems.append(System(name, "notify", {"tree": tree}, env={"NOTIFY_WEBHOOKS": json.dumps(hooks)}))
    if ns.only:
        systems = [s for s in systems if s.name in ns.only.split(",")]
    try:
        return await run(systems, ns.waves, ns.users, ns.settle, Path(ns.profile) if ns.profile else None)
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load.connects", description=__doc__)
    parser.add_argument("--waves", type=int, default=8)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--today", default=None, help="git revision to weigh too, with no webhooks")
    parser.add_argument(
        "--hooked-tree", action="append", help="NAME=DIR: the service in DIR, hooked, weighed too (a change's A/B)"
    )
    parser.add_argument("--only", default=None, help="comma-separated names of the systems to run (none is needed)")
    parser.add_argument("--profile", default=None, help="py-spy raw profiles of each replica go here")
    ns = parser.parse_args(argv)
    import uvloop

    if ns.profile:
        Path(ns.profile).mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        today = stack.enter_context(exported(ns.today)) if ns.today else None
        summary = uvloop.run(main_async(ns, today))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
