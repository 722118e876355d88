"""What the unread fallback costs a targeted publish, weighed on replicas kept up:
`python -m tests.load.fallbackab [--rounds 7] [--users 500] [--rate 1000] [--seconds 5]`.

Two replicas, each on its own redis-server and each with `--users` users online (two sockets each),
started once and kept up: `none` (no webhooks) and `hooked` (an endpoint for `notification.unread`,
`user.online` and `user.offline`, answered by a local receiver). Each round publishes targeted
notifications at `--rate` for `--seconds` three ways, the order rotated each round: to `none` plain,
to `hooked` plain, and to `hooked` with `fallback: unread after 60 s` on every notification; each
waits for every delivery. Ratios of publishes per server CPU-second are taken within a round, so the
machine's drift cancels; medians and ranges over the rounds. The webhooks bench (tests/load/webhooks.py)
starts a fresh deployment per system and round, whose start-up and first connects swing a 5 s step
by more than the 20 % the target allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import uuid

from tests.receiver import new_secret
from tests.utils import RedisServer, token

from .clients import Fleet, Publisher
from .procs import Server, System
from .push import ab_round
from .webhooks import Receiver

FALLBACK = {"fallback": {"when": "unread", "after_seconds": 60}}
KINDS = {"none plain": ("none", {}), "hooked plain": ("hooked", {}), "hooked fallback": ("hooked", FALLBACK)}


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    ns = parser.parse_args(argv)

    loop = asyncio.get_running_loop()
    receiver = await loop.create_server(Receiver, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{receiver.sockets[0].getsockname()[1]}/hook"
    events = ["notification.unread", "user.online", "user.offline"]
    envs = {
        "none": {},
        "hooked": {"NOTIFY_WEBHOOKS": json.dumps([{"url": url, "secret": new_secret(), "events": events}])},
    }
    redises: list[RedisServer] = []
    servers: dict[str, Server] = {}
    fleets: dict[str, Fleet] = {}
    pubs: dict[str, Publisher] = {}
    ratios: dict[str, list[float]] = {"hooked fallback / none plain": [], "hooked fallback / hooked plain": []}
    lost = 0
    try:
        for name, env in envs.items():
            redis = RedisServer()
            redis.start()
            redises.append(redis)
            server = servers[name] = System(name, "notify", env=env).replica(redis, f"f{uuid.uuid4().hex[:8]}").start()
            fleets[name] = Fleet("notify", ns.users)
            tokens = [token(f"u{i >> 1}", ttl=3600) for i in range(2 * ns.users)]
            _, failures = await fleets[name].connect_all(lambda _i, port=server.port: port, tokens, 50, 30.0)
            if failures:
                raise RuntimeError(f"{failures} sockets of {name} failed to connect")
            pubs[name] = Publisher(server.port, token("fallback-ab", "notify:publish", ttl=3600))
            await pubs[name].open(16)
        for system, extra in KINDS.values():  # warm-up
            await ab_round(servers[system], fleets[system], pubs[system], extra, 250.0, 1.0)
        for r in range(ns.rounds):
            got = {}
            order = list(KINDS)[r % 3 :] + list(KINDS)[: r % 3]
            for kind in order:
                system, extra = KINDS[kind]
                result = await ab_round(servers[system], fleets[system], pubs[system], extra, ns.rate, ns.seconds)
                got[kind], lost = result["publishes_per_cpu_s"], lost + result["lost"]
            ratios["hooked fallback / none plain"].append(got["hooked fallback"] / got["none plain"])
            ratios["hooked fallback / hooked plain"].append(got["hooked fallback"] / got["hooked plain"])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:,.0f}/CPU-s" for k, v in got.items()), flush=True)
    finally:
        for name in list(pubs):
            pubs[name].close()
        for fleet in fleets.values():
            await fleet.close_all()
        for server in servers.values():
            server.stop()
        for redis in redises:
            redis.stop()
        receiver.close()
    for name, values in ratios.items():
        print(f"{name}: {statistics.median(values):.2f}x [{min(values):.2f}, {max(values):.2f}]")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{ns.rounds} rounds, {ns.rate:g} publishes/s for {ns.seconds:g} s; lost {lost}; load average {load}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
