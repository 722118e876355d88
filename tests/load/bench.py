"""Orchestration: sessions per system and round, alternating systems, medians across rounds."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import workloads as W
from .capacity import run_capacity, summarize_capacity
from .clients import Fleet, Publisher
from .pings import PINGED, run_pings, summarize_pings
from .procs import Deployment, System

NOTIFY = System("notify-service", "notify")
SOCKETIO = System("python-socketio", "socketio", server="python")
NODE_SOCKETIO = System("node-socketio", "socketio", server="node")
# Framework-free floors, speaking the service's protocol: what the service's extras cost.
LEAN_PYTHON = System("lean-python", "notify", server="lean-python")
LEAN_NODE = System("lean-node", "notify", server="lean-node")
# Opt-in: Python with no server stack at all (targeted and broadcast only; see raw_server.py).
RAW_PYTHON = System("raw-python", "notify", server="raw-python")

# The topic workload's one topic (a Socket.IO room of the same name), and the namespace the service is
# configured with for it: any user may join, nothing else on (no presence, no member publishing).
TOPIC = "bench:room"
TOPIC_NAMESPACES = '{"bench":{"join":"any"}}'


def with_topics(system: System) -> System:
    """The system as the topic workload runs it: the service with the bench namespace configured."""
    if system.server != "service":
        return system  # the Socket.IO servers and the lean references take any room
    return dataclasses.replace(system, env={**system.env, "NOTIFY_TOPICS": TOPIC_NAMESPACES})


@dataclass
class Plan:
    users: int = 1000  # two sockets each
    # Three rounds of 10 s steps rather than two of 20: a median of three, with each round's ratio
    # beside it, says more than two longer runs, and `make bench` stays near an hour.
    duration: float = 10.0  # seconds per targeted step, broadcast run and batch run
    rates: list[float] = field(default_factory=lambda: [250, 500, 1000, 2000, 3000, 4000, 6000, 8000])
    broadcast_rate: float = 10.0
    topic_rate: float = 10.0  # messages per second to the one topic every socket joins
    pair_rate: float = 1000.0
    batch_rate: float = 1000.0
    batch_size: int = 100
    rounds: int = 3
    drain: float = 5.0  # seconds allowed after a run for the last deliveries before they count as lost
    concurrency: int = 100  # handshakes in flight while connecting
    # Joins in flight in the topic session. Set when a join's presence write took a connection of the
    # service's Redis pool (64, refusing beyond); presence now rides the pipelined connection, and the
    # figure is kept so that runs compare.
    join_concurrency: int = 32
    # The capacity session (capacity.py): the service alone, on one Redis and on a three-primary Redis Cluster.
    capacity_rate: float = 2000.0  # POST /notify per second in either mode, the same in both
    capacity_raw_streams: int = 2000  # streams the raw driver publishes to
    capacity_raw_seconds: float = 3.0  # at most, per timed phase of the raw driver
    capacity_subscribers: int = 16  # subscriber connections on the broadcast channel, raw driver
    sessions: list[str] = field(default_factory=lambda: ["targeted", "broadcast", "pair", "topic", "pings", "capacity"])
    embedded: bool = False  # notify only: no Redis (the smoke test)
    pin: bool = False  # replicas on their own CPU (`Deployment.pin`): steadier A/B, not for the report
    warmup: bool = True
    profile_dir: str | None = None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


AfterConnect = Callable[[Deployment, Fleet], Awaitable[None]]


@contextlib.asynccontextmanager
async def _session(  # type: ignore[no-untyped-def]
    system: System, plan: Plan, replicas: int = 1, after_connect: AfterConnect | None = None
):
    embedded = plan.embedded and system.server == "service"
    with Deployment(system, replicas, embedded=embedded) as dep:
        if plan.pin:
            dep.pin()
        fleet = Fleet(system.kind, plan.users)
        ports = [r.port for r in dep.replicas]
        connect = await W.connect(dep, fleet, lambda i: ports[i % len(ports)], plan.concurrency)
        pub = Publisher(ports[0], W.publisher_token())
        await pub.open(16)
        try:
            if after_connect is not None:  # measured as connect was: on a server that has done nothing else
                await after_connect(dep, fleet)
            if plan.warmup:  # code paths, pools and caches warm before anything is measured
                await W.targeted(dep, fleet, pub, 200, 1.0, plan.drain)
            yield dep, fleet, pub, connect
        finally:
            pub.close()
            await fleet.close_all()


class _Profiler:
    """py-spy record on one server while a workload runs (root needed); raw collapsed stacks."""

    def __init__(self, profile_dir: str | None, name: str, pid: int, seconds: float) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        if profile_dir is None:
            return
        out = Path(profile_dir) / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        exe = Path(sys.executable).with_name("py-spy")
        self.proc = subprocess.Popen(
            [
                str(exe),
                "record",
                "-p",
                str(pid),
                "-d",
                str(max(1, int(seconds))),
                "-r",
                "200",
                "-f",
                "raw",
                "-o",
                str(out),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _failures(step: dict[str, Any]) -> str:
    """What the publishes that failed got: each status other than 2xx (0: the connection closed with the
    request on it), and how many were still unanswered when the drain ran out."""
    failed = {k: v for k, v in step["statuses"].items() if not k.startswith("2")}
    if step["unanswered"]:
        failed["unanswered"] = step["unanswered"]
    if step.get("lost_after_idle_s"):
        failed["lost after idle (s)"] = step["lost_after_idle_s"][:10]
    return f" {failed}" if failed else ""


async def run_targeted(system: System, plan: Plan, round_index: int = 0) -> dict[str, Any]:
    async with _session(system, plan) as (dep, fleet, pub, connect):
        steps = []
        for rate in plan.rates:
            prof = (
                _Profiler(plan.profile_dir, f"targeted-{int(rate)}", dep.replicas[0].pid, plan.duration)
                if system.server == "service" and rate == 1000
                else None
            )
            step = await W.targeted(dep, fleet, pub, rate, plan.duration, plan.drain)
            if prof:
                prof.wait()
            steps.append(step)
            _log(
                f"  {system.name} targeted {rate:g}/s: delivered {step['delivered_per_s'] or 0:.0f}/s "
                f"p99 {step['p99_ms'] or 0:.1f} ms, {step['deliveries_per_cpu_s'] or 0:.0f}/cpu-s, "
                f"lost {step['lost']}, errors {step['http_errors']}{_failures(step)}, holds={step['holds']}"
            )
            if not step["holds"] and rate >= 1000:
                break
            if fleet.alive() < len(fleet.listeners):
                _log(f"  {system.name}: {len(fleet.listeners) - fleet.alive()} sockets closed; stopping the sweep")
                break
        return {"connect": connect, "steps": steps}


async def run_broadcast(system: System, plan: Plan, round_index: int = 0) -> dict[str, Any]:
    async with _session(system, plan) as (dep, fleet, pub, connect):
        out: dict[str, Any] = {"connect": connect}
        if system.server == "service" and plan.batch_size:
            single = await W.targeted(dep, fleet, pub, plan.batch_rate, plan.duration, plan.drain)
            batch = await W.targeted(dep, fleet, pub, plan.batch_rate, plan.duration, plan.drain, batch=plan.batch_size)
            out["batch_single"], out["batch"] = single, batch
            _log(
                f"  {system.name} batch of {plan.batch_size} at {plan.batch_rate:g}/s: "
                f"{batch['deliveries_per_cpu_s'] or 0:.0f}/cpu-s (single: {single['deliveries_per_cpu_s'] or 0:.0f})"
            )
        profile_dir = plan.profile_dir if system.server == "service" else None
        prof = _Profiler(profile_dir, "broadcast", dep.replicas[0].pid, plan.duration)
        result = await W.broadcast(dep, fleet, pub, plan.broadcast_rate, plan.duration, plan.drain)
        if prof:
            prof.wait()
        out["broadcast"] = result
        _log(
            f"  {system.name} broadcast {plan.broadcast_rate:g}/s to {result['sockets']}: fan-out p99 "
            f"{result['fanout_p99_ms']} ms, {result['deliveries_per_cpu_s'] or 0:.0f}/cpu-s, lost {result['lost']} "
            f"{result['fanout_note']}"
        )
        return out


async def run_pair(system: System, plan: Plan, round_index: int = 0) -> dict[str, Any]:
    async with _session(system, plan, replicas=2) as (dep, fleet, pub, connect):
        step = await W.targeted(dep, fleet, pub, plan.pair_rate, plan.duration, plan.drain)
        _log(
            f"  {system.name} two replicas {plan.pair_rate:g}/s: p99 {step['p99_ms'] or 0:.1f} ms, "
            f"{step['deliveries_per_cpu_s'] or 0:.0f}/cpu-s, lost {step['lost']}"
        )
        return {"connect": connect, "step": step}


async def run_topic(system: System, plan: Plan, round_index: int = 0) -> dict[str, Any]:
    """Every socket joins one topic (a Socket.IO room), server CPU per join against per connect; then a
    broadcast run and a topic run at the same rate over the same sockets, in the same process (which goes
    first alternates by round): the topic's fan-out against the broadcast's, the same work."""
    out: dict[str, Any] = {}

    async def join_all(dep: Deployment, fleet: Fleet) -> None:
        out["join"] = await W.join(dep, fleet, TOPIC, plan.join_concurrency)

    async with _session(with_topics(system), plan, after_connect=join_all) as (dep, fleet, pub, connect):
        out["connect"] = connect
        join = out["join"]
        _log(
            f"  {system.name} join: {join['joined']} joined ({join['join_failures']} failed) at "
            f"{join['joins_per_s'] or 0:.0f}/s; server CPU-us per join {join['cpu_us_per_join'] or 0:.0f}, "
            f"per connect {connect['cpu_us_per_connect'] or 0:.0f}; idle server CPU after connecting "
            f"{100 * (connect['idle_server_cpu_util'] or 0):.1f}%"
            + (f"; failures: {join['join_errors']}" if join["join_failures"] else "")
        )
        # Both fan-out paths warm (a second each, not measured) before either is, so that neither run
        # pays for first use; which is measured first still alternates by round.
        if plan.warmup:
            await W.broadcast(dep, fleet, pub, plan.topic_rate, 1.0, plan.drain)
            await W.topic(dep, fleet, pub, TOPIC, plan.topic_rate, 1.0, plan.drain)
        order = ["broadcast", "topic"] if round_index % 2 == 0 else ["topic", "broadcast"]
        for kind in order:
            if kind == "topic":
                result = await W.topic(dep, fleet, pub, TOPIC, plan.topic_rate, plan.duration, plan.drain)
            else:
                result = await W.broadcast(dep, fleet, pub, plan.topic_rate, plan.duration, plan.drain)
            out[kind] = result
            _log(
                f"  {system.name} {kind} {plan.topic_rate:g}/s to {result['sockets']}: fan-out p99 "
                f"{result['fanout_p99_ms']} ms, {result['deliveries_per_cpu_s'] or 0:.0f}/cpu-s, "
                f"lost {result['lost']}, dup {result['duplicates']}, misrouted {result['misrouted']} "
                f"{result['fanout_note']}"
            )
        return out


RUNNERS = {
    "targeted": run_targeted,
    "broadcast": run_broadcast,
    "pair": run_pair,
    "topic": run_topic,
    "capacity": run_capacity,
    "pings": run_pings,
}
# Sessions only some systems take (by `System.server`): the capacity session weighs the service against
# itself (one Redis against a cluster); the keepalive one needs a keepalive the session can set; the
# Python floor (raw_server.py) has no topics, and would wait out every topic message undelivered.
ONLY_FOR = {
    "capacity": {"service"},
    "pings": PINGED,
    "topic": {"service", "python", "node", "lean-python", "lean-node"},
}


async def run(systems: list[System], plan: Plan) -> dict[str, Any]:
    """Every session for every system, alternating which system goes first, `plan.rounds` times."""
    rounds: list[dict[str, dict[str, Any]]] = []
    for r in range(plan.rounds):
        order = systems if r % 2 == 0 else list(reversed(systems))
        results: dict[str, dict[str, Any]] = {s.name: {} for s in systems}
        for session in plan.sessions:
            for system in order:
                if session in ONLY_FOR and system.server not in ONLY_FOR[session]:
                    continue
                _log(f"round {r + 1}/{plan.rounds}: {system.name} {session}")
                results[system.name][session] = await RUNNERS[session](system, plan, r)
        rounds.append(results)
    return {
        "plan": asdict(plan),
        "systems": [asdict(s) for s in systems],
        "rounds": rounds,
        "summary": summarize(systems, plan, rounds),
        "load": os.getloadavg(),
    }


def _median(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def knee(steps: list[dict[str, Any]]) -> float | None:
    """The highest rate of the unbroken run of holding steps from the lowest rate up."""
    best = None
    for step in steps:
        if not step["holds"]:
            break
        best = step["rate"]
    return best


_STEP_KEYS = [
    "delivered_per_s",
    "publish_rate",
    "p50_ms",
    "p99_ms",
    "max_ms",
    "deliveries_per_cpu_s",
    "deliveries_per_cpu_s_with_redis",
    "server_cpu_util",
    "server_kernel_share",
    "generator_cpu_util",
    "lost",
    "duplicates",
    "http_errors",
    "misrouted",
]


_FANOUT_KEYS = (
    "fanout_p50_ms",
    "fanout_p99_ms",
    "fanout_max_ms",
    "delivered_per_s",
    "deliveries_per_cpu_s",
    "deliveries_per_cpu_s_with_redis",
    "lost",
    "duplicates",
    "server_cpu_util",
    "server_kernel_share",
    "sockets",
)


def _over(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _summarize_topic(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds; the topic-to-broadcast and join-to-connect ratios are taken within each
    session (same process, same sockets) before the median."""
    out: dict[str, Any] = {"runs": len(sessions)}
    for kind in ("topic", "broadcast"):
        runs = [s[kind] for s in sessions if kind in s]
        out[kind] = {k: _median([x.get(k) for x in runs]) for k in _FANOUT_KEYS}
        out[kind]["misrouted"] = _median([x.get("misrouted", 0) for x in runs])
        out[kind]["notes"] = [x["fanout_note"] for x in runs if x["fanout_note"]]
    both = [s for s in sessions if "topic" in s and "broadcast" in s]
    out["per_cpu_vs_broadcast"] = _median(
        [_over(s["topic"]["deliveries_per_cpu_s"], s["broadcast"]["deliveries_per_cpu_s"]) for s in both]
    )
    out["p99_vs_broadcast"] = _median(
        [_over(s["topic"]["fanout_p99_ms"], s["broadcast"]["fanout_p99_ms"]) for s in both]
    )
    joins = [s["join"] for s in sessions]
    for key in ("joined", "join_failures", "joins_per_s", "joins_per_cpu_s", "cpu_us_per_join"):
        out[key] = _median([j[key] for j in joins])
    out["cpu_us_per_connect"] = _median([s["connect"].get("cpu_us_per_connect") for s in sessions])
    out["idle_server_cpu_util"] = _median([s["connect"].get("idle_server_cpu_util") for s in sessions])
    out["join_vs_connect"] = _median(
        [_over(s["join"]["cpu_us_per_join"], s["connect"].get("cpu_us_per_connect")) for s in sessions]
    )
    return out


def summarize(systems: list[System], plan: Plan, rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in systems:
        per = [r[s.name] for r in rounds]
        summary: dict[str, Any] = {"rounds": len(per)}
        # Connect and memory figures come from the one-replica sessions (two per round).
        sessions_1 = [sess["connect"] for r in per for k, sess in r.items() if k not in ("pair", "capacity", "pings")]
        for key in (
            "connects_per_s",
            "connects_per_cpu_s",
            "connect_failures",
            "rss_kb_per_socket",
            "rss_mb_per_1000",
            "rss_base_mb",
        ):
            summary[key] = _median([c[key] for c in sessions_1])
        if any("targeted" in r for r in per):
            by_rate: dict[float, list[dict[str, Any]]] = {}
            for r in per:
                for step in r.get("targeted", {}).get("steps", []):
                    by_rate.setdefault(step["rate"], []).append(step)
            summary["targeted"] = {
                rate: {
                    "runs": len(steps),
                    **{k: _median([st.get(k) for st in steps]) for k in _STEP_KEYS},
                    "holds_all": all(st["holds"] for st in steps),
                }
                for rate, steps in sorted(by_rate.items())
            }
            # The highest rate that held in every round: a median of per-round knees can be a rate
            # that no round ran.
            steps = [{"rate": rate, "holds": row["holds_all"]} for rate, row in summary["targeted"].items()]
            summary["knee"] = knee(steps)
        if any("broadcast" in r for r in per):
            bs = [r["broadcast"]["broadcast"] for r in per if "broadcast" in r]
            summary["broadcast"] = {k: _median([b.get(k) for b in bs]) for k in _FANOUT_KEYS}
            summary["broadcast"]["notes"] = [b["fanout_note"] for b in bs if b["fanout_note"]]
            for key in ("batch", "batch_single"):
                runs = [r["broadcast"][key] for r in per if key in r.get("broadcast", {})]
                if runs:
                    summary[key] = {k: _median([b.get(k) for b in runs]) for k in _STEP_KEYS}
        if any("pair" in r for r in per):
            ps = [r["pair"]["step"] for r in per if "pair" in r]
            summary["pair"] = {k: _median([p.get(k) for p in ps]) for k in _STEP_KEYS}
        if any("topic" in r for r in per):
            summary["topic"] = _summarize_topic([r["topic"] for r in per if "topic" in r])
        if any("pings" in r for r in per):
            summary["pings"] = summarize_pings([r["pings"] for r in per if "pings" in r])
        if any("capacity" in r for r in per):
            summary["capacity"] = summarize_capacity([r["capacity"] for r in per if "capacity" in r])
        out[s.name] = summary
    return out
