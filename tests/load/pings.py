"""The keepalive session: what an open socket with nothing to deliver costs, its pings and pongs.

One replica on one Redis, the fleet connected and idle, pings every `interval` seconds (production: 20 s;
half a second here, so that ten seconds hold enough of them to weigh): server CPU per ping and its pong,
from /proc, over the pings the sockets counted. The service pings with `NOTIFY_PING_INTERVAL`; lean-node
with the keepalive of `ws`'s documentation (`BENCH_PING_INTERVAL`: a ping to each socket that answered
the last, a cut for one that did not). The other systems keep their sockets alive their own way
(Engine.IO's ping packets) and are left out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import sys
from typing import Any

from . import workloads as W
from .clients import Fleet
from .procs import CpuWindow, Deployment, System

# The systems (by `System.server`) whose keepalive the session can set.
PINGED = {"service", "lean-node"}


def ping_env(system: System, interval: float) -> dict[str, str]:
    if system.server == "service":
        return {"NOTIFY_PING_INTERVAL": f"{interval:g}", "NOTIFY_PING_TIMEOUT": "10"}
    return {"BENCH_PING_INTERVAL": f"{interval:g}"}


async def run_pings(
    system: System, plan: Any, round_index: int = 0, interval: float = 0.5, seconds: float = 10.0
) -> dict[str, Any]:
    env = {**system.env, **ping_env(system, interval)}
    with Deployment(dataclasses.replace(system, env=env)) as dep:
        fleet = Fleet(system.kind, plan.users, count_pings=True)
        port = dep.replicas[0].port
        try:
            connect = await W.connect(dep, fleet, lambda i: port, plan.concurrency, settle=2 * interval)
            window = CpuWindow(dep).start()
            before = fleet.pings
            await asyncio.sleep(seconds)
            window.stop()
            pings = fleet.pings - before
            alive = fleet.alive()
        finally:
            await fleet.close_all()
    # Counted, not taken from the interval: a server's timers may round it (the service's run on a
    # quarter-second wheel), and the figure is CPU per ping actually sent and answered.
    per_ping = window.server / pings * 1e6 if pings else None
    print(
        f"  {system.name} idle, a ping every {interval:g} s to {connect['sockets']} sockets: "
        f"{pings} pings in {window.wall:.1f} s, {per_ping or 0:.1f} us of server CPU per ping and pong, "
        f"{alive} alive after",
        file=sys.stderr,
        flush=True,
    )
    return {
        "sockets": connect["sockets"],
        "alive_after": alive,
        "interval_s": interval,
        "server_cpu_s": window.server,
        "wall_s": window.wall,
        "server_cpu_util": window.server / window.wall if window.wall else None,
        "server_kernel_share": window.kernel_share,
        "pings": pings,
        "pings_per_socket_s": pings / connect["sockets"] / window.wall if connect["sockets"] and window.wall else None,
        "server_cpu_us_per_ping": per_ping,
    }


def summarize_pings(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds."""
    out: dict[str, Any] = {"runs": len(sessions)}
    for key in (
        "sockets",
        "interval_s",
        "server_cpu_util",
        "server_kernel_share",
        "server_cpu_us_per_ping",
        "alive_after",
    ):
        values = [s[key] for s in sessions if s.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    return out


__all__ = ["PINGED", "run_pings", "summarize_pings"]
