"""The load benchmark's harness (tests/load), run tiny against one real replica so it cannot rot.

Not a timed test: it checks that the harness measures what it claims (every delivery counted,
nothing lost or doubled, latency and server CPU read), not how fast the service is."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from tests.load import webhooks
from tests.load import workloads as W
from tests.load.bench import LEAN_PYTHON, NOTIFY, RAW_PYTHON, TOPIC, Plan, with_topics
from tests.load.capacity import history_size, run_mode, run_raw
from tests.load.clients import IDLE_EXPIRY_SECONDS, Fleet, Publisher
from tests.load.pings import run_pings, summarize_pings
from tests.load.procs import Deployment, System


async def _run(system: System) -> dict[str, dict]:
    # The service on its embedded broker; the lean references need the Redis the deployment starts.
    # raw-python speaks targeted notifications and broadcasts only.
    topics = system is not RAW_PYTHON
    with Deployment(with_topics(system), 1, embedded=system is NOTIFY) as dep:
        port = dep.replicas[0].port
        fleet = Fleet("notify", users=5)
        out = {"connect": await W.connect(dep, fleet, lambda i: port, concurrency=10, timeout=10, settle=0.2)}
        pub = Publisher(port, W.publisher_token())
        await pub.open(2)
        try:
            # Sockets 8 and 9 stay out of the topic: a message reaching them would be misrouted.
            if topics:
                out["join"] = await W.join(dep, fleet, TOPIC, concurrency=10, timeout=10, only=range(8))
            out["targeted"] = await W.targeted(dep, fleet, pub, rate=100, duration=1.0, drain=5.0)
            out["broadcast"] = await W.broadcast(dep, fleet, pub, rate=5, duration=1.0, drain=5.0)
            if topics:
                out["topic"] = await W.topic(dep, fleet, pub, TOPIC, rate=3, duration=1.0, drain=5.0)
        finally:
            pub.close()
            await fleet.close_all()
    return out


@pytest.mark.parametrize("system", [NOTIFY, LEAN_PYTHON, RAW_PYTHON], ids=lambda s: s.name)
def test_bench_harness_counts_every_delivery(system: System):
    runs = asyncio.run(_run(system))
    connect, targeted, broadcast = (runs[k] for k in ("connect", "targeted", "broadcast"))
    assert connect["sockets"] == 10 and connect["connect_failures"] == 0
    assert connect["connects_per_s"] > 0 and connect["rss_idle_mb"] > 0
    assert connect["cpu_us_per_connect"] is not None  # ten connects may take less than a clock tick

    assert targeted["notifications"] == 100 and targeted["accepted"] == 100, targeted["statuses"]
    assert targeted["http_errors"] == 0 and targeted["lost_after_idle_s"] == []
    assert targeted["expected"] == 200 and targeted["delivered"] == 200  # both devices of each user
    assert targeted["lost"] == 0 and targeted["duplicates"] == 0 and targeted["misrouted"] == 0
    assert 0 < targeted["p50_ms"] <= targeted["p99_ms"] <= targeted["max_ms"]
    assert targeted["server_cpu_s"] > 0 and targeted["deliveries_per_cpu_s"] > 0

    assert broadcast["accepted"] == 5 and broadcast["sockets"] == 10
    assert broadcast["delivered"] == 50 and broadcast["lost"] == 0 and broadcast["duplicates"] == 0
    assert broadcast["misrouted"] == 0
    assert broadcast["complete_broadcasts"] == 5 and broadcast["fanout_p99_ms"] is not None

    if system is RAW_PYTHON:
        assert "join" not in runs and "topic" not in runs
        return
    join, topic = runs["join"], runs["topic"]
    assert join["joined"] == 8 and join["join_failures"] == 0 and join["joins_per_s"] > 0
    assert join["cpu_us_per_join"] is not None  # a handful of joins may take less than a clock tick

    # Every member socket has every message once, and the two sockets outside the topic none.
    assert topic["topic"] == TOPIC and topic["accepted"] == 3 and topic["http_errors"] == 0, topic["statuses"]
    assert topic["sockets"] == 8 and topic["expected"] == 24 and topic["delivered"] == 24
    assert topic["lost"] == 0 and topic["duplicates"] == 0 and topic["misrouted"] == 0 and topic["stale"] == 0
    assert topic["complete_broadcasts"] == 3
    assert 0 < topic["fanout_p50_ms"] <= topic["fanout_p99_ms"] <= topic["fanout_max_ms"]


def test_a_pinned_deployment_keeps_its_server_apart_and_gives_this_process_its_cpus_back():
    cpus = sorted(os.sched_getaffinity(0))
    with Deployment(LEAN_PYTHON) as dep:
        assert dep.redis is not None and dep.redis.proc is not None
        dep.pin()
        server = os.sched_getaffinity(dep.replicas[0].pid)
        redis = os.sched_getaffinity(dep.redis.proc.pid)
        generator = os.sched_getaffinity(0)
    if len(cpus) > 1:
        assert server == {cpus[-1]} and redis == generator == set(cpus[:-1])
    else:  # nothing to keep apart
        assert server == redis == generator == set(cpus)
    assert os.sched_getaffinity(0) == set(cpus)


def test_keepalive_session_counts_the_pings_it_prices():
    """The keepalive session, tiny: the sockets answer the replica's pings themselves and count them
    (a ping every 0.5 s to 10 sockets for 1.6 s: three rounds, give or take one), all stay open, and
    the CPU per ping is read from those counted."""
    plan = Plan(users=5, concurrency=10)
    run = asyncio.run(run_pings(NOTIFY, plan, interval=0.5, seconds=1.6))
    assert run["sockets"] == 10 and run["alive_after"] == 10
    assert 20 <= run["pings"] <= 40, run
    assert run["server_cpu_us_per_ping"] is not None and run["server_cpu_us_per_ping"] >= 0
    assert summarize_pings([run])["server_cpu_us_per_ping"] == run["server_cpu_us_per_ping"]


def test_capacity_session_measures_one_redis():
    """The capacity session's raw driver and its single-Redis mode, tiny: the service's own publish command runs
    (no errors), history is filled to its cap, every notification is delivered, and CPU and memory are read."""
    plan = Plan(
        users=5,
        duration=1.0,
        drain=5.0,
        warmup=False,
        concurrency=10,
        capacity_rate=50,
        capacity_raw_streams=20,
        capacity_raw_seconds=0.3,
        capacity_subscribers=2,
    )

    async def run() -> tuple[dict, dict]:
        return await run_raw(plan), await run_mode(NOTIFY, "single", plan, settle=0.2, idle_s=0.2)

    raw, single = asyncio.run(run())
    assert raw["streams"] == 20 and raw["history_cap"] == history_size()
    for phase in ("below_cap", "at_cap", "broadcast_alone", "broadcast_subscribed"):
        assert raw[phase]["publishes"] > 0 and raw[phase]["errors"] == 0, (phase, raw[phase])
    assert raw["memory_per_entry"] > 0 and raw["memory_per_full_stream"] > raw["memory_per_entry"]

    assert single["primaries"] == 1 and single["replicas"] == 0
    assert single["history_filled"] == 5 * history_size()
    assert single["pipelined_at_cap"]["publishes"] > 0 and single["redis_memory_per_full_stream"] > 0
    step = single["step"]
    assert step["accepted"] == 50 and step["http_errors"] == 0, step["statuses"]
    assert step["delivered"] == 100 and step["lost"] == 0 and step["duplicates"] == 0 and step["misrouted"] == 0
    # Fifty publishes may take less than a clock tick of either process: read, not necessarily above zero.
    assert single["publishes"] == 50 and single["primaries_cpu_s"] >= 0 and step["server_cpu_s"] >= 0


def test_logcost_pairs_defaults_with_tuned_and_the_report_shows_it(tmp_path):
    """The defaults' cost harness, tiny: the README's defaults and the tuned settings, three rounds
    each, every delivery counted, a ratio to tuned with its spread written where `make bench`'s
    report picks it up."""
    from tests.load import logcost
    from tests.load.report import _defaults_cost

    out = tmp_path / "logcost.md"
    argv = ["--rate", "50", "--seconds", "0.5", "--rounds", "3", "--users", "5", "--connections", "2"]
    assert asyncio.run(logcost.main([*argv, "--out", str(out)])) == 0
    table = out.read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "ratio to tuned" in rows["mode"]
    assert rows["tuned"].split(" | ")[3].startswith("1.000, IQR 1.000-1.000 [1.000, 1.000]")
    assert ", IQR " in rows["default"].split(" | ")[3]
    assert "3 rounds per mode alternating (order rotated each round)" in table
    assert "Lost deliveries and failed publishes over every round: 0." in table

    lines: list[str] = []
    _defaults_cost(tmp_path, lines.append)
    assert lines[0] == "## What the defaults cost" and rows["default"] in lines


async def _webhook_delivery() -> dict:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(webhooks.Receiver, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
        _, delivering = webhooks.systems(Path("."), url)
        return await webhooks.delivery_session(delivering, rate=50, duration=1.0)
    finally:
        server.close()


def test_webhook_harness_counts_every_event(tmp_path):
    """Each `fallback: offline` publish of the delivery session is one event the receiver answers,
    with its latency read; the report section the workload writes survives a rewrite of the rest."""
    result = asyncio.run(_webhook_delivery())
    assert result["accepted"] == 50 and result["events"] == 50
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["events_per_cpu_s"] > 0
    doc = tmp_path / "benchmark.md"
    doc.write_text("# Benchmark\n")
    webhooks.place(doc, f"{webhooks.START}\n## Webhooks\n{webhooks.END}")
    assert webhooks.kept_section(doc) == f"{webhooks.START}\n## Webhooks\n{webhooks.END}"
    assert doc.read_text().startswith("# Benchmark\n")


def test_a_rewrite_of_the_report_keeps_the_sections_written_after_it(tmp_path, monkeypatch):
    """`make bench` writes the report, then the webhooks and Web Push sections into it; a rewrite of
    the report on its own (`--report-from`, a session run again) keeps both as they were."""
    from tests.load import push, report
    from tests.load.report import write

    # The latency plot needs matplotlib, one of the bench extras that `make test` does not install.
    monkeypatch.setattr(report, "_plot", lambda summary, path: None)

    results = json.loads((Path(__file__).parent.parent / "docs" / "bench" / "results.json").read_text())
    doc = tmp_path / "benchmark.md"
    doc.write_text("# Old report\n")
    webhooks.place(doc, f"{webhooks.START}\n## Webhooks\nfigures\n{webhooks.END}")
    push.write_section(doc, f"{push.HEADING}\n\npush figures\n")
    write(results, tmp_path / "bench", doc, "python -m tests.load", "today")
    text = doc.read_text()
    assert not text.startswith("# Old report")
    assert text.count("## Webhooks\nfigures\n") == 1 and text.count(f"{push.HEADING}\n\npush figures\n") == 1
    assert text.index("## Webhooks") < text.index(push.HEADING)


def test_the_report_gives_each_figure_against_lean_node_as_a_ratio_round_by_round():
    """Ratios are taken within a round (the systems alternate in it), inverted where less is better, and
    the kernel's share of the server's CPU stands beside them."""
    from tests.load.report_lean import section

    def sessions(per_cpu: float, p99: float, rss: float, ping_us: float, share: float) -> dict:
        step = {"rate": 1000.0, "deliveries_per_cpu_s": per_cpu, "server_kernel_share": share}
        connect = {"rss_kb_per_socket": rss, "connects_per_s": 1000.0, "connects_per_cpu_s": 1000.0}
        fanout = {"deliveries_per_cpu_s": per_cpu, "fanout_p99_ms": p99, "server_kernel_share": share}
        return {
            "targeted": {"connect": connect, "steps": [step]},
            "broadcast": {"connect": connect, "broadcast": fanout},
            "pings": {"server_cpu_us_per_ping": ping_us, "server_kernel_share": share},
        }

    results = {
        "plan": {"rates": [1000.0]},
        "rounds": [
            {"notify-service": sessions(900, 30, 9, 15, 0.2), "lean-node": sessions(1000, 40, 10, 12, 0.3)},
            {"notify-service": sessions(1200, 40, 9, 12, 0.4), "lean-node": sessions(1000, 20, 9, 12, 0.5)},
            {"notify-service": sessions(1100, 10, 9, 24, 0.3), "lean-node": sessions(1000, 10, 9, 12, 0.4)},
        ],
    }
    lines: list[str] = []
    section(results, lines.append)
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines if line.startswith("| ")}
    assert rows["targeted at 1,000 POST/s: deliveries per server CPU-s"] == [
        "1,100", "1,000", "1.10x", "0.90, 1.20, 1.10", "30% / 40% |"
    ]  # fmt: skip
    assert rows["broadcast: fan-out p99 (ms)"][2:4] == ["1.00x", "1.33, 0.50, 1.00"]  # lean's p99 over ours
    assert rows["idle RSS per socket (KB)"][2:4] == ["1.00x", "1.11, 1.00, 1.00"]
    assert rows["server CPU-µs per ping and pong"][2:4] == ["0.80x", "0.80, 1.00, 0.50"]
    assert "topic: deliveries per server CPU-s" not in rows  # no topic session ran
    no_lean = {"plan": results["plan"], "rounds": [{"notify-service": r["notify-service"]} for r in results["rounds"]]}
    lines.clear()
    section(no_lean, lines.append)
    assert lines == []


def test_the_publisher_pool_lets_a_connection_go_before_the_server_does(single):
    """A pooled connection idle for IDLE_EXPIRY_SECONDS is closed, not used, so the harness never
    sends on one the service is closing for idling (a publish lost and counted as the server's)."""

    async def run() -> tuple[list[int], int]:
        pub = Publisher(single.port, W.publisher_token())
        await pub.open(1)
        statuses: list[int] = []
        first = pub.idle[0]
        pub.request("/notify/u1", b'{"event":"e"}', lambda status, body: statuses.append(status))
        await pub.drained(10)
        first.idle_since -= IDLE_EXPIRY_SECONDS  # as if it had sat idle that long since its answer
        pub.request("/notify/u1", b'{"event":"e"}', lambda status, body: statuses.append(status))
        await pub.drained(10)
        second = pub.idle[0]
        pub.close()
        assert second is not first and first.transport is not None and first.transport.is_closing()
        return statuses, pub.errors

    assert asyncio.run(run()) == ([202, 202], 0)
