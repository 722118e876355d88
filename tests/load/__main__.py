"""Command line: `python -m tests.load [--quick] [--scale N] [--out docs/bench]`."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from .bench import LEAN_NODE, LEAN_PYTHON, NODE_SOCKETIO, NOTIFY, RAW_PYTHON, SOCKETIO, Plan, run
from .procs import System, node_status


def _variant(spec: str) -> System:
    """`ws=wsproto,loop=asyncio` (runner options), `env:NOTIFY_ACCESS_LOG=false` or `tree=DIR` (another
    checkout of the service): the service, changed."""
    variant: dict[str, str] = {}
    env: dict[str, str] = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.startswith("env:"):
            env[key[4:]] = value
        else:
            variant[key] = value
    return System(f"notify-service[{spec}]", "notify", variant, env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs for development (3 s steps, 250 users)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply users (sockets) and rates")
    parser.add_argument("--out", default="docs/bench", help="directory for the plot and raw results")
    parser.add_argument("--doc", default=None, help="the Markdown report (default: <out>/../benchmark.md)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None)
    parser.add_argument("--rates", default=None, help="comma-separated targeted rates")
    parser.add_argument(
        "--capacity-rate", type=float, default=None, help="POST/s in both modes of the capacity session (2000)"
    )
    parser.add_argument(
        "--sessions", default=None, help="comma-separated: targeted,broadcast,pair,topic,pings,capacity"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated systems to run, of notify, socketio (python-socketio), node-socketio, lean-python, "
        "lean-node, and raw-python (never run unless named: tests/load/raw_server.py)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="also run the service changed: 'ws=wsproto', 'loop=asyncio,http=h11', "
        "'patch=async-runtime-dep', 'env:NOTIFY_ACCESS_LOG=false', 'tree=DIR' (another checkout)",
    )
    parser.add_argument("--no-baseline", action="store_true", help="with --variant: skip the unchanged service")
    parser.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="py-spy the service at 1,000/s targeted and during broadcast (needs root)",
    )
    parser.add_argument("--no-report", action="store_true", help="print the summary; write no files")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server on the last CPU, Redis and the generator on the others (targeted, broadcast, pair and "
        "topic sessions): rounds spread a few per cent, not fifteen; for weighing a change (--variant tree=DIR)",
    )
    parser.add_argument(
        "--report-from", default=None, metavar="JSON", help="rewrite the report from a results.json instead of running"
    )
    parser.add_argument(
        "--merge-into",
        default=None,
        metavar="JSON",
        help="with --sessions capacity: put this run's capacity figures into an earlier results.json (the rest of "
        "it kept), keep this run's raw figures beside it as results-capacity.json, and rewrite the report",
    )
    ns = parser.parse_args(argv)
    if ns.report_from:
        from .report import write

        out = Path(ns.out)
        saved = json.loads(Path(ns.report_from).read_text())
        doc = Path(ns.doc) if ns.doc else out.parent / "benchmark.md"
        write(saved, out, doc, saved.get("command", "python -m tests.load"), saved.get("started", "?"))
        print(f"wrote {doc} and {out}/", file=sys.stderr)
        return 0

    plan = Plan()
    if ns.quick:
        plan.users, plan.duration, plan.rates, plan.drain = 250, 3.0, [500, 1000, 2000, 4000], 3.0
        plan.capacity_raw_streams, plan.capacity_raw_seconds = 500, 1.0
    plan.users = int(plan.users * ns.scale)
    plan.rates = [r * ns.scale for r in plan.rates]
    plan.pair_rate *= ns.scale
    plan.capacity_rate *= ns.scale
    if ns.rounds is not None:
        plan.rounds = ns.rounds
    if ns.duration is not None:
        plan.duration = ns.duration
    if ns.rates:
        plan.rates = [float(r) for r in ns.rates.split(",")]
    if ns.capacity_rate is not None:
        plan.capacity_rate = ns.capacity_rate
    if ns.sessions:
        plan.sessions = ns.sessions.split(",")
    if ns.merge_into and plan.sessions != ["capacity"]:
        parser.error("--merge-into takes the capacity session alone (--sessions capacity)")
    if "capacity" in plan.sessions and shutil.which("redis-cli") is None:
        # tests.topology.ClusterTopology joins its nodes with `redis-cli --cluster create`.
        if plan.sessions == ["capacity"]:
            parser.error("the capacity session needs redis-cli on PATH (it builds a Redis Cluster with it)")
        plan.sessions = [s for s in plan.sessions if s != "capacity"]
        print("redis-cli is not on PATH: the capacity session is left out", file=sys.stderr)
    plan.profile_dir = ns.profile
    plan.pin = ns.pin

    node = node_status()
    peers = {"socketio": SOCKETIO, "node-socketio": NODE_SOCKETIO, "lean-python": LEAN_PYTHON, "lean-node": LEAN_NODE}
    needs_node = {"node-socketio", "lean-node"}
    only = ns.only.split(",") if ns.only else None
    opt_in = {"raw-python": RAW_PYTHON}  # run only when named
    if only and (unknown := set(only) - {"notify", *peers, *opt_in}):
        parser.error(f"--only: unknown system {', '.join(sorted(unknown))}")
    node_wanted = not ns.variant and (only is None or bool(needs_node & set(only)))
    systems = [] if ns.no_baseline else [NOTIFY]
    systems += [_variant(v) for v in ns.variant]
    if only:
        if needs_node & set(only) and "left_out" in node:
            parser.error(f"{', '.join(sorted(needs_node & set(only)))} cannot run: {node['left_out']}")
        chosen = peers | opt_in
        systems = [s for s in systems if "notify" in only] + [chosen[name] for name in only if name in chosen]
    elif not ns.variant:
        systems += [s for key, s in peers.items() if key not in needs_node or "left_out" not in node]
        if "left_out" in node:
            print(f"Node Socket.IO and the lean Node reference left out: {node['left_out']}", file=sys.stderr)

    import uvloop

    started = time.strftime("%Y-%m-%d %H:%M %Z")
    results = uvloop.run(run(systems, plan))
    command = "python -m tests.load " + shlex.join(argv if argv is not None else sys.argv[1:])
    results["command"], results["started"] = command.strip(), started
    for summary in results["summary"].values():
        if "capacity" in summary:  # it says where it came from, should it be merged into another run's report
            summary["capacity"] |= {"command": command.strip(), "started": started, "load": results["load"]}
    if ns.merge_into:
        return _merge(results, Path(ns.merge_into), Path(ns.out), ns.doc)
    if node_wanted:
        results["node"] = node  # its versions, or why it was left out, for the report's conditions
    summary = json.dumps(results["summary"], indent=1, default=str)
    if ns.no_report or ns.variant or ns.profile:
        print(summary)
        if ns.no_report:
            return 0
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "results.json" if not (ns.variant or ns.profile) else f"results-{time.strftime('%H%M%S')}.json"
    (out / name).write_text(json.dumps(results, indent=1, default=str))
    if ns.variant or ns.profile:
        print(f"wrote {out / name}", file=sys.stderr)
        return 0
    from .report import write

    doc = Path(ns.doc) if ns.doc else out.parent / "benchmark.md"
    write(results, out, doc, results["command"], started)
    print(f"wrote {doc} and {out}/", file=sys.stderr)
    return 0


def _merge(results: dict, into: Path, out: Path, doc_path: str | None) -> int:
    """The capacity figures of this run into an earlier run's results (whose other figures stay as they were);
    this run's raw figures beside them; the report rewritten from the merged results."""
    from .report import write

    saved = json.loads(into.read_text())
    for name, summary in results["summary"].items():
        if "capacity" in summary:
            saved["summary"].setdefault(name, {})["capacity"] = summary["capacity"]
    out.mkdir(parents=True, exist_ok=True)
    into.write_text(json.dumps(saved, indent=1, default=str))
    (out / "results-capacity.json").write_text(json.dumps(results, indent=1, default=str))
    doc = Path(doc_path) if doc_path else out.parent / "benchmark.md"
    write(saved, out, doc, saved.get("command", "python -m tests.load"), saved.get("started", "?"))
    print(f"wrote {into}, {out / 'results-capacity.json'} and {doc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
