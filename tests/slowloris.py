"""A slow-loris and silent-connection attacker, in a process of its own so that its work does not
weigh on the measurements of the test that runs it.

    python -m tests.slowloris --port P --slow 1000 --silent 1000 --interval 1 --seconds 30

Slow connections send the start of a request head, then one more header line every `--interval`
seconds, for ever; silent ones connect and send nothing. It prints `opened <n>` once every
connection is open, then one JSON line when the server has closed them all (or `--seconds` ran out):
for each kind, how many opened, were closed, and what they were answered, and the longest time a
connection of that kind was held open.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Held:
    kind: str
    opened: float = 0.0
    closed: float | None = None
    answer: bytes = b""
    lines_sent: int = 0


@dataclass
class Attack:
    held: list[Held] = field(default_factory=list)
    failed: int = 0


async def _hold(held: Held, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, interval: float) -> None:
    try:
        if held.kind == "slow":
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: victim\r\n")
            held.lines_sent = 1
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(4096), interval if held.kind == "slow" else None)
            except TimeoutError:
                writer.write(b"X-Slow-%d: still here\r\n" % held.lines_sent)
                held.lines_sent += 1
                continue
            if not chunk:
                break
            held.answer += chunk
    except (ConnectionError, OSError):
        pass
    held.closed = time.monotonic()
    with contextlib.suppress(Exception):
        writer.close()


async def _open(
    attack: Attack, kind: str, host: str, port: int, interval: float, tasks: list[asyncio.Task[None]]
) -> None:
    held = Held(kind)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        attack.failed += 1
        return
    held.opened = time.monotonic()
    attack.held.append(held)
    tasks.append(asyncio.create_task(_hold(held, reader, writer, interval)))


async def run(host: str, port: int, slow: int, silent: int, interval: float, seconds: float) -> dict[str, object]:
    attack = Attack()
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    kinds = ["slow"] * slow + ["silent"] * silent
    # Interleaved, in batches small enough for the listen backlog.
    kinds = [k for pair in zip(kinds[:slow], kinds[slow:], strict=False) for k in pair] + kinds[2 * min(slow, silent) :]
    for i in range(0, len(kinds), 100):
        await asyncio.gather(*(_open(attack, k, host, port, interval, tasks) for k in kinds[i : i + 100]))
    print(f"opened {len(attack.held)}", flush=True)
    opened_s = time.monotonic() - started
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, seconds - opened_s)):
            await asyncio.gather(*tasks)
    for task in tasks:
        task.cancel()
    summary: dict[str, object] = {"failed_to_open": attack.failed, "open_seconds": round(opened_s, 3)}
    for kind in ("slow", "silent"):
        of_kind = [h for h in attack.held if h.kind == kind]
        closed = [h for h in of_kind if h.closed is not None]
        statuses: dict[str, int] = {}
        for h in closed:
            status = h.answer[9:12].decode("latin-1") if h.answer.startswith(b"HTTP/1.1 ") else "none"
            statuses[status] = statuses.get(status, 0) + 1
        summary[kind] = {
            "opened": len(of_kind),
            "closed": len(closed),
            "answers": statuses,
            "max_held_s": round(max((h.closed - h.opened for h in closed), default=0.0), 3),  # type: ignore[operator]
            "min_held_s": round(min((h.closed - h.opened for h in closed), default=0.0), 3),  # type: ignore[operator]
            "max_lines_sent": max((h.lines_sent for h in of_kind), default=0),
            "sample_answer": next((h.answer.decode("latin-1") for h in closed if h.answer), ""),
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--silent", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    ns = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = ns.slow + ns.silent + 100
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    summary = asyncio.run(run(ns.host, ns.port, ns.slow, ns.silent, ns.interval, ns.seconds))
    print(json.dumps(summary), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
