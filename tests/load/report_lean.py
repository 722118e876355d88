"""The report's section against the lean Node server: each figure as a ratio, round by round.

lean-node (node/lean.js) is a framework-free `ws` server with a Redis client: the floor a Python
service is measured against. Systems alternate within a round, so the ratio of a round compares two
runs minutes apart on the same machine; the median of those ratios, with each round's beside it,
says more than a ratio of two medians taken in different rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .bench import LEAN_NODE, NOTIFY, _median

OURS, LEAN = NOTIFY.name, LEAN_NODE.name

Sessions = dict[str, Any]
Pick = Callable[[Sessions], Any]


def _step(rate: float) -> Pick:
    def pick(sessions: Sessions) -> Any:
        for step in sessions.get("targeted", {}).get("steps", []):
            if step["rate"] == rate:
                return step
        return None

    return pick


def _part(session: str, key: str) -> Pick:
    return lambda sessions: sessions.get(session, {}).get(key)


def _connects(sessions: Sessions) -> dict[str, Any]:
    """A round's connect figures: the median over its one-replica sessions, as the summary takes them."""
    runs = [sessions[name]["connect"] for name in ("targeted", "broadcast", "topic") if name in sessions]
    keys = ("rss_kb_per_socket", "connects_per_s", "connects_per_cpu_s")
    return {key: _median([run.get(key) for run in runs]) for key in keys}


def _figures(plan: dict[str, Any]) -> list[tuple[str, Pick, str, bool]]:
    """(label, what of a round's sessions, which value, lower is better)."""
    rows: list[tuple[str, Pick, str, bool]] = [
        (f"targeted at {rate:,.0f} POST/s: deliveries per server CPU-s", _step(rate), "deliveries_per_cpu_s", False)
        for rate in plan["rates"]
    ]
    rows += [
        ("broadcast: deliveries per server CPU-s", _part("broadcast", "broadcast"), "deliveries_per_cpu_s", False),
        ("broadcast: fan-out p99 (ms)", _part("broadcast", "broadcast"), "fanout_p99_ms", True),
        ("topic: deliveries per server CPU-s", _part("topic", "topic"), "deliveries_per_cpu_s", False),
        ("topic: fan-out p99 (ms)", _part("topic", "topic"), "fanout_p99_ms", True),
        ("idle RSS per socket (KB)", _connects, "rss_kb_per_socket", True),
        ("authenticated connects/s", _connects, "connects_per_s", False),
        ("connects per server CPU-s", _connects, "connects_per_cpu_s", False),
        ("server CPU-µs per ping and pong", lambda s: s.get("pings"), "server_cpu_us_per_ping", True),
    ]
    return rows


def _num(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def section(results: dict[str, Any], add: Callable[[str], None]) -> None:
    """Write the section, if both systems ran."""
    rounds = [r for r in results["rounds"] if OURS in r and LEAN in r]
    if not rounds:
        return
    add(f"## Against {LEAN}, round by round")
    add("")
    add(
        f"Each figure of {OURS} as a ratio to {LEAN}'s in the same round (above 1: {OURS} does better; for "
        "memory, latency and CPU per ping the ratio is inverted so that this still holds), the median of those "
        "ratios, and each round's. The kernel's share is the part of the server's CPU spent in system time "
        "(writes, reads, epoll), which no change to a server's own code removes; at equal kernel work, a "
        "ratio can rise above 1 by no more than the other's total over its kernel part."
    )
    add("")
    add(f"| figure | {OURS} | {LEAN} | ratio | by round | kernel share, {OURS} / {LEAN} |")
    add("| --- | ---: | ---: | ---: | --- | ---: |")
    for label, pick, key, lower_better in _figures(results["plan"]):
        ours_values, lean_values, ratios, shares_ours, shares_lean = [], [], [], [], []
        for r in rounds:
            a, b = pick(r[OURS]), pick(r[LEAN])
            if not a or not b or a.get(key) is None or b.get(key) is None:
                continue
            ours_values.append(a[key])
            lean_values.append(b[key])
            if a[key] and b[key]:
                ratios.append(b[key] / a[key] if lower_better else a[key] / b[key])
            shares_ours.append(a.get("server_kernel_share"))
            shares_lean.append(b.get("server_kernel_share"))
        if not ratios:
            continue
        digits = 1 if lower_better else 0
        share_a, share_b = _median(shares_ours), _median(shares_lean)
        shares = "" if share_a is None or share_b is None else f"{100 * share_a:.0f}% / {100 * share_b:.0f}%"
        add(
            f"| {label} | {_num(_median(ours_values), digits)} | {_num(_median(lean_values), digits)} | "
            f"{_median(ratios):.2f}x | {', '.join(f'{x:.2f}' for x in ratios)} | {shares} |"
        )
    add("")


__all__ = ["section"]
