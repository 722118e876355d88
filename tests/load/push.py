"""What Web Push costs: pushes per server CPU-second, and what `push` adds to a publish to an online user.

    python -m tests.load.push [--users 100] [--rate 100] [--seconds 5]
                              [--ab-users 250] [--ab-rate 500] [--ab-seconds 2] [--rounds 5]

One Redis and one replica with VAPID configured, pushing to a local push service (RFC 8030, the
one the push tests use: it checks VAPID and a sample of payloads is decrypted with http_ece).
(a) `--users` users, offline, each with two Web Push devices; `--rate` POST /notify/{user} a second
with `push` for `--seconds`, until every device has taken its push: pushes taken per CPU-second of
the replica (its threads' schedstat) and the encryption per device (the mean of
`notify_push_encrypt_seconds` over the run). The local push service answers over HTTP/1.0, so each
push opens a connection, which a real push service (HTTP/2, kept alive) would spare.
(b) `--ab-users` users online, two sockets each and two Web Push devices each: rounds alternate (the
order rotated every round) between publishes with `push` and `fallback: offline` and the same
publishes without them, `--ab-rate` a second for `--ab-seconds`, each waiting for every delivery.
The ratio is the replica's publishes per CPU-second with push over those without in the same pair
of rounds (rounds are paired so that the machine's drift cancels): its median and its range.
"""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.pushkit import PushService, Subscription, vapid_pem
from tests.utils import RedisServer, token

from .clients import Fleet, Publisher, paced, perf
from .logcost import cpu_seconds
from .procs import Server, System

HEADING = "## Web Push"
PUSH = {"title": "Order shipped", "body": "Arrives Tuesday", "url": "https://shop.example.com/o/7", "tag": "o7"}


async def metrics(port: int) -> dict[str, float]:
    """The replica's push figures: encryptions (count, seconds) and pushes taken."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=30)).text
    out = {"encrypt_count": 0.0, "encrypt_sum": 0.0, "sent": 0.0}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == "notify_push_encrypt_seconds_count":
            out["encrypt_count"] = float(value)
        elif name == "notify_push_encrypt_seconds_sum":
            out["encrypt_sum"] = float(value)
        elif name.startswith("notify_pushes_total{") and 'result="sent"' in name:
            out["sent"] += float(value)
    return out


async def register(port: int, service: PushService, users: list[str]) -> dict[str, Subscription]:
    """Two Web Push devices for each user, through the API as a page would; subscriptions by push path."""
    subscriptions: dict[str, Subscription] = {}
    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=30) as http:

        async def one(user: str, device: str) -> None:
            sub = Subscription(service.endpoint(f"{user}-{device}"))
            subscriptions[f"/push/{user}-{device}"] = sub
            body = {"kind": "webpush", "subscription": sub.to_json()}
            headers = {"Authorization": f"Bearer {token(user, ttl=3600)}"}
            async with sem:
                answer = await http.put(f"http://127.0.0.1:{port}/me/devices/{device}", json=body, headers=headers)
            if answer.status_code != 200:
                raise RuntimeError(f"device of {user}: {answer.status_code} {answer.text}")

        await asyncio.gather(*(one(u, d) for u in users for d in ("laptop", "phone")))
    return subscriptions


async def publish(pub: Publisher, rate: float, seconds: float, body_of: Any, users: int) -> int:
    """`rate` publishes a second for `seconds`, user i % users; how many were accepted."""
    accepted = 0

    def fire(i: int, t: float) -> None:
        def done(status: int, _body: bytes) -> None:
            nonlocal accepted
            accepted += 200 <= status < 300

        pub.request(f"/notify/u{i % users}", orjson.dumps(body_of(i, t)), done)

    await paced(rate, int(rate * seconds), fire, seconds + 30)
    await pub.drained(30.0)
    return accepted


async def pushes(server: Server, pub: Publisher, service: PushService, subs: dict[str, Subscription], ns: Any) -> dict:
    before, taken0 = await metrics(server.port), len(service.accepted)
    cpu0, wall0 = cpu_seconds(server.pid), perf()
    accepted = await publish(
        pub, ns.rate, ns.seconds, lambda i, t: {"event": "bench.push", "data": {"k": i}, "push": PUSH}, ns.users
    )
    deadline = perf() + 120
    while len(service.accepted) - taken0 < 2 * accepted and perf() < deadline:
        await asyncio.sleep(0.05)
    cpu, wall = cpu_seconds(server.pid) - cpu0, perf() - wall0
    after = await metrics(server.port)
    taken = service.accepted[taken0:]
    for request in taken[:: max(1, len(taken) // 20)]:  # a sample decrypts to what was published
        assert subs[request.path].decrypt(request.body)["title"] == PUSH["title"]
    encryptions = after["encrypt_count"] - before["encrypt_count"]
    return {
        "publishes": accepted,
        "pushes": len(taken),
        "missing": 2 * accepted - len(taken),
        "server_cpu_s": cpu,
        "server_cpu_util": cpu / wall,
        "pushes_per_cpu_s": len(taken) / cpu if cpu else 0.0,
        "encrypt_us": 1e6 * (after["encrypt_sum"] - before["encrypt_sum"]) / encryptions if encryptions else 0.0,
        "encryptions": encryptions,
    }


async def quiet(service: PushService) -> int:
    """Requests the push service has had once none came for a second (a retry of (a) is not (b)'s)."""
    seen, deadline = -1, perf() + 60
    while len(service.received) != seen and perf() < deadline:
        seen = len(service.received)
        await asyncio.sleep(1.0)
    return seen


async def ab_round(server: Server, fleet: Fleet, pub: Publisher, extra: dict, rate: float, seconds: float) -> dict:
    rec = fleet.recorder
    count = int(rate * seconds)
    run = rec.reset(count, 0)
    for i in range(count):
        rec.user_of[i] = i % fleet.users
    cpu0 = cpu_seconds(server.pid)
    accepted = await publish(
        pub, rate, seconds, lambda i, t: {"event": "bench.ab", "data": {"t": t, "k": i, "r": run}, **extra}, fleet.users
    )
    deadline = perf() + 30
    while rec.received < 2 * accepted and perf() < deadline:
        await asyncio.sleep(0.01)
    cpu = cpu_seconds(server.pid) - cpu0
    return {"publishes": accepted, "lost": 2 * accepted - rec.received, "publishes_per_cpu_s": accepted / cpu}


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100, help="(a) offline users, two devices each (100)")
    parser.add_argument("--rate", type=float, default=100.0, help="(a) publishes with push per second (100)")
    parser.add_argument("--seconds", type=float, default=5.0, help="(a) publishing time (5)")
    parser.add_argument("--ab-users", type=int, default=250, help="(b) online users, two sockets each (250)")
    parser.add_argument("--ab-rate", type=float, default=500.0, help="(b) publishes per second (500)")
    parser.add_argument("--ab-seconds", type=float, default=2.0, help="(b) each round's publishing time (2)")
    parser.add_argument("--rounds", type=int, default=5, help="(b) rounds of each kind, at least 3 (5)")
    parser.add_argument("--doc", default=None, help="write the section into this report (docs/benchmark.md)")
    ns = parser.parse_args(argv)
    if ns.rounds < 3:
        parser.error("--rounds must be at least 3")

    redis = RedisServer()
    redis.start()
    server: Server | None = None
    fleet: Fleet | None = None
    pub: Publisher | None = None
    with PushService().running() as service:
        try:
            env = {
                "NOTIFY_VAPID_PRIVATE_KEY": vapid_pem(),
                "NOTIFY_VAPID_SUBJECT": "mailto:ops@example.com",
                "NOTIFY_PUSH_ALLOWED_ORIGINS": service.origin,
            }
            server = System("push", "notify", env=env).replica(redis, f"p{uuid.uuid4().hex[:8]}").start()
            users = max(ns.users, ns.ab_users)
            subs = await register(server.port, service, [f"u{i}" for i in range(users)])
            pub = Publisher(server.port, token("push-publisher", "notify:publish", ttl=3600))
            await pub.open(16)

            # (a) offline users: users u0.. have no socket yet.
            await pushes(server, pub, service, subs, argparse.Namespace(**{**vars(ns), "seconds": 1.0}))  # warm-up
            a = await pushes(server, pub, service, subs, ns)
            print(
                f"(a) {a['publishes']} publishes with push to {ns.users} offline users: {a['pushes']} pushes taken "
                f"({a['missing']} missing), {a['pushes_per_cpu_s']:,.0f} per server CPU-s, CPU "
                f"{a['server_cpu_util']:.0%}, encryption {a['encrypt_us']:,.0f} µs per device "
                f"({a['encryptions']:.0f} encryptions)",
                flush=True,
            )

            # (b) the same replica, users online: no push goes out, the publish only checks for it.
            fleet = Fleet("notify", ns.ab_users)
            tokens = [token(f"u{i >> 1}", ttl=3600) for i in range(2 * ns.ab_users)]
            _, failures = await fleet.connect_all(lambda i: server.port, tokens, 50, 30.0)  # type: ignore[union-attr]
            if failures:
                raise RuntimeError(f"{failures} sockets failed to connect")
            kinds = {"push": {"push": PUSH, "fallback": {"when": "offline"}}, "plain": {}}
            rounds: dict[str, list[dict]] = {k: [] for k in kinds}
            pushed0 = await quiet(service)
            for extra in kinds.values():  # warm-up
                await ab_round(server, fleet, pub, extra, min(ns.ab_rate, 250.0), 1.0)
            for r in range(ns.rounds):
                for kind in list(kinds)[r % 2 :] + list(kinds)[: r % 2]:
                    result = await ab_round(server, fleet, pub, kinds[kind], ns.ab_rate, ns.ab_seconds)
                    rounds[kind].append(result)
                    print(
                        f"(b) round {r + 1} {kind:>5}: {result['publishes_per_cpu_s']:,.0f} publishes per CPU-s, "
                        f"lost {result['lost']}",
                        flush=True,
                    )
            stray = len(service.received) - pushed0
            for request in service.received[pushed0:]:  # what went out, to see why
                print(f"(b) a push sent: {request.path} {subs[request.path].decrypt(request.body)}", flush=True)
        finally:
            if fleet is not None:
                await fleet.close_all()
            if pub is not None:
                pub.close()
            if server is not None:
                server.stop()
            redis.stop()

    pairs = zip(rounds["push"], rounds["plain"], strict=True)
    ratios = [p["publishes_per_cpu_s"] / q["publishes_per_cpu_s"] for p, q in pairs]
    figures = {
        **{k: v for k, v in vars(ns).items() if k != "doc"},
        "pushes_per_cpu_s": a["pushes_per_cpu_s"],
        "encrypt_us": a["encrypt_us"],
        "server_cpu_util": a["server_cpu_util"],
        "ratio": statistics.median(ratios),
        "ratio_low": min(ratios),
        "ratio_high": max(ratios),
        "with_push": statistics.median(r["publishes_per_cpu_s"] for r in rounds["push"]),
        "without": statistics.median(r["publishes_per_cpu_s"] for r in rounds["plain"]),
        "stray": stray,
        "lost": a["missing"] + sum(r["lost"] for k in rounds for r in rounds[k]),
        "load": os.getloadavg(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    text = section(figures)
    print("\n" + text)
    if ns.doc:
        write_section(Path(ns.doc), text)
    return 0 if figures["lost"] == 0 and stray == 0 else 1


def section(f: dict[str, Any]) -> str:
    """The report's Web Push section, from one run's figures."""
    load = ", ".join(f"{x:.1f}" for x in f["load"])
    return f"""{HEADING}

`python -m tests.load.push` (run by `make bench` after the rest), one replica on one Redis with VAPID
configured, pushing to a local push service on the same machine (RFC 8030, VAPID checked, a sample of
payloads decrypted with http_ece). {f["when"]}, {os.cpu_count()} CPUs, load average {load} (the machine
was shared with other work: the figures are this run's, not the machine's best).

| | figure |
| --- | ---: |
| Web Push: pushes taken per server CPU-second | {f["pushes_per_cpu_s"]:,.0f} |
| encryption per device (aes128gcm, mean of `notify_push_encrypt_seconds`) | {f["encrypt_us"]:,.0f} µs |
| publish with `push` + `fallback: offline`, user online, against without (median [range]) | \
{f["ratio"]:.2f}x [{f["ratio_low"]:.2f}, {f["ratio_high"]:.2f}] |
| the same, publishes per server CPU-second with / without (medians) | \
{f["with_push"]:,.0f} / {f["without"]:,.0f} |

- Pushes: {f["users"]} offline users with 2 Web Push devices each, {f["rate"]:g} publishes/s with `push` for
  {f["seconds"]:g} s, until every device has taken its push.
- A push costs the replica about {1e6 / f["pushes_per_cpu_s"]:,.0f} µs of CPU (its share of the publish
  included), the encryption about {f["encrypt_us"]:,.0f} µs of it; the rest is the publish, the outbox job
  and the request. The local push service answers over HTTP/1.0, so every push opens a connection,
  which a push service keeping it open spares: this figure is on the low side.
- The A/B, in publishes per server CPU-second, {f["rounds"]} paired rounds: {f["ab_users"]} users online
  with 2 sockets each (and 2 Web Push devices each, so the push path has devices to consider),
  {f["ab_rate"]:g} POST /notify/{{user}} a second for {f["ab_seconds"]:g} s a round,
  the two kinds alternating with the order rotated every round, each round waiting for every delivery;
  pushes sent during the A/B: {f["stray"]}; missing pushes and lost deliveries: {f["lost"]}.
"""


def _bounds(old: str) -> tuple[int, int] | None:
    """Where the section is in a report: from its heading to the next heading or the end."""
    start = old.find(HEADING + "\n")
    if start < 0:
        return None
    end = old.find("\n## ", start + len(HEADING))
    return start, (len(old) if end < 0 else end + 1)


def write_section(doc: Path, text: str) -> None:
    """Put the section in the report, in place of an earlier one (the rest of the report as it is)."""
    old = doc.read_text() if doc.exists() else ""
    bounds = _bounds(old)
    if bounds is None:
        doc.write_text(old.rstrip("\n") + "\n\n" + text)
        return
    doc.write_text(old[: bounds[0]] + text + old[bounds[1] :])


def kept_section(doc: Path) -> str | None:
    """The section of an existing report, for a rewrite of the rest (`report.write`) to keep."""
    old = doc.read_text() if doc.exists() else ""
    bounds = _bounds(old)
    return None if bounds is None else old[bounds[0] : bounds[1]]


if __name__ == "__main__":
    import uvloop

    raise SystemExit(uvloop.run(main()))
