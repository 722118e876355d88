"""Redis Sentinel, with real processes the tests own.

The service finds the primary through the sentinels, follows it across a failover (a SIGKILLed
primary, or a demoted one that stays up), keeps every client socket open meanwhile, and with
NOTIFY_REDIS_REPLICAS_ACK answers 202 only for what a replica has confirmed. `pytest -s` prints
the figures (`FIGURES ...`), recorded in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import orjson
import pytest
import redis

from .test_faults import connect_many, is_ready, report, wait_for
from .test_replicas_ack import wait_for_202
from .topology import Node, SentinelTopology
from .utils import TIMEOUT, Client, Replica, publish, publisher_headers, started


def _key(id_: str) -> tuple[int, int]:
    ms, _, seq = id_.partition("-")
    return int(ms), int(seq)


async def history_ids(http: httpx.AsyncClient, replica: Replica, user: str) -> set[str]:
    """Every id in the user's retained history, paging back from the newest."""
    ids: set[str] = set()
    before = None
    for _ in range(100):
        params = {"limit": 100, **({"before": before} if before else {})}
        response = await http.get(
            f"{replica.url}/users/{user}/notifications", params=params, headers=publisher_headers()
        )
        assert response.status_code == 200, response.text
        page = [n["id"] for n in response.json()["notifications"]]
        if not page:
            return ids
        ids.update(page)
        before = page[-1]
    raise AssertionError("history did not end within 100 pages")


def _place(frame: dict[str, Any]) -> tuple[bool, str]:
    """A notification's stream (broadcast or not) and id: ids are unique within a stream only."""
    return bool(frame.get("broadcast")), frame["id"]


async def frames_until(client: Client, want: set[tuple[bool, str]], within: float) -> list[dict[str, Any]]:
    """Notifications received until every one of `want` is in (or `within` ran out: the caller counts
    what is missing), then whatever else comes in 0.3 s."""
    got: list[dict[str, Any]] = []
    seen: set[tuple[bool, str]] = set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not want.issubset(seen):
                frame = orjson.loads(await client.ws.recv())
                if frame["type"] == "notification":
                    got.append(frame)
                    seen.add(_place(frame))
                else:
                    assert frame["type"] != "resync", "a failover keeps the data: replay, not resync"
    try:
        async with asyncio.timeout(0.3):
            while True:
                frame = orjson.loads(await client.ws.recv())
                if frame["type"] == "notification":
                    got.append(frame)
    except TimeoutError:
        pass
    return got


@pytest.mark.slow
async def test_sigkill_primary_under_two_publishers(http):
    """SIGKILL the primary while two publishers run and 40 sockets sit on two replicas: the service
    follows the promoted replica, no socket closes, and with NOTIFY_REDIS_REPLICAS_ACK=1 every
    notification answered 202 reaches every socket of its user exactly once and stays in history."""
    # Two replicas: after the failover the new primary still has one to confirm publishes.
    with SentinelTopology(replicas=2) as topo:
        env = topo.env(NOTIFY_REDIS_REPLICAS_ACK="1", NOTIFY_HISTORY_SIZE="5000")
        with started(Replica(env), Replica(env)) as (a, b):
            users = [f"fo{i}" for i in range(20)]
            clients = {user: [*(await connect_many(a, [user])), *(await connect_many(b, [user]))] for user in users}
            sent: dict[str, list[str]] = {user: [] for user in users}
            broadcasts: list[str] = []
            outcomes: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
            refused_data: set[int] = set()  # publishes answered 503: they may still be delivered
            stop = asyncio.Event()

            async def publisher(name: str, replica: Replica, offset: int) -> None:
                i = offset
                while not stop.is_set() and i < 40_000:
                    user = users[i % len(users)]
                    target = None if i % 25 == 0 else user
                    response = await publish(http, replica, target, "seq", i)
                    status = response.status_code
                    outcomes[name].append((time.monotonic(), status))
                    if status == 202:
                        (broadcasts if target is None else sent[user]).append(response.json()["id"])
                    else:
                        assert status == 503, response.text
                        refused_data.add(i)
                        await asyncio.sleep(0.02)  # as a client backing off would
                    i += 2

            switched = asyncio.create_task(switch_announced(topo))
            tasks = [asyncio.create_task(publisher("a", a, 0)), asyncio.create_task(publisher("b", b, 1))]
            await asyncio.sleep(1.5)
            old = topo.primary
            killed_at = time.monotonic()
            old.kill()
            new = await asyncio.to_thread(topo.wait_promotion, old, 20)
            promoted_at = time.monotonic()
            ready_s = await asyncio.gather(*(wait_for(lambda r=r: is_ready(http, r), 10) for r in (a, b)))
            announced_at = await asyncio.wait_for(switched, 20)
            await wait_for(lambda: _published_since(outcomes, promoted_at), 10)
            back_at = {name: next(t for t, s in outcomes[name] if t > promoted_at and s == 202) for name in outcomes}
            await asyncio.sleep(2.0)
            stop.set()
            await asyncio.gather(*tasks)

            assert all(not c.ws.close_code for group in clients.values() for c in group), "no socket may close"
            statuses = [s for name in outcomes for _, s in outcomes[name]]
            during_switch = sum(
                1 for name in outcomes for t, s in outcomes[name] if s == 503 and killed_at <= t <= back_at[name]
            )
            accepted = statuses.count(202)
            assert accepted > 200

            async def check(user: str, client: Client) -> tuple[int, int, int]:
                """(acknowledged notifications the socket never got, duplicates, frames of 503 publishes)."""
                want = {(False, i) for i in sent[user]} | {(True, i) for i in broadcasts}
                frames = await frames_until(client, want, TIMEOUT * 3)
                got = [_place(frame) for frame in frames]
                for broadcast in (False, True):
                    stream = [i for b, i in got if b == broadcast]
                    assert stream == sorted(stream, key=_key), f"{user}: out of order within a stream"
                # A publish answered 503 may still have been stored and delivered (its script ran,
                # then the deadline passed); anything else arriving is a bug.
                extra = [frame["data"] for frame in frames if _place(frame) not in want]
                assert set(extra) <= refused_data, f"{user}: delivered but never published: {extra[:5]}"
                return len(want - set(got)), len(got) - len(set(got)), len(extra)

            checked = await asyncio.gather(*(check(user, c) for user in users for c in clients[user]))
            lost, duplicates, extra_total = (sum(column) for column in zip(*checked, strict=True))
            for user in users:
                kept = await history_ids(http, a, user)
                missing = set(sent[user]) - kept
                assert not missing, f"{user}: {len(missing)} acknowledged notifications not in history"

            report(
                "sentinel_sigkill",
                sockets=2 * len(users),
                promotion_s=promoted_at - killed_at,
                switch_announced_after_promotion_s=announced_at - promoted_at,
                first_202_after_announce_a_s=back_at["a"] - announced_at,
                first_202_after_announce_b_s=back_at["b"] - announced_at,
                ready_after_promotion_s=max(ready_s),
                first_202_after_promotion_s=max(back_at.values()) - promoted_at,
                accepted_202=accepted,
                answered_503=statuses.count(503),
                answered_503_during_switch=during_switch,
                other_status=len(statuses) - accepted - statuses.count(503),
                frames_checked=sum(len(sent[u]) + len(broadcasts) for u in users) * 2,
                lost=lost,
                duplicates=duplicates,
                frames_of_503_publishes=extra_total,
                new_primary_port=new.port,
            )
            assert lost == 0 and duplicates == 0, (lost, duplicates)
            assert max(back_at.values()) - promoted_at < 10, "the service follows within 10 s of the promotion"
            for group in clients.values():
                await asyncio.gather(*(c.close() for c in group))


async def switch_announced(topo: SentinelTopology) -> float:
    """When the first sentinel announces +switch-master: from then on a sentinel names the new primary."""
    import redis.asyncio as aioredis

    async def heard(port: int) -> float:
        sentinel = aioredis.Redis(port=port, decode_responses=True)
        pubsub = sentinel.pubsub()
        try:
            await pubsub.subscribe("+switch-master")
            async with asyncio.timeout(60):
                while await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0) is None:
                    pass
                return time.monotonic()
        finally:
            await pubsub.aclose()
            await sentinel.aclose()

    listeners = [asyncio.create_task(heard(s.port)) for s in topo.sentinels]
    try:
        done, _ = await asyncio.wait(listeners, return_when=asyncio.FIRST_COMPLETED)
        return min(task.result() for task in done)
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)


async def _published_since(outcomes: dict[str, list[tuple[float, int]]], since: float) -> bool:
    """Both publishers had a 202 after `since`."""
    return all(any(t > since and s == 202 for t, s in v) for v in outcomes.values())


def _subscribers(node: Node, channel: str) -> int:
    try:
        return int(node.call("PUBSUB", "SHARDNUMSUB", channel)[1])
    except redis.RedisError:
        return -1


@pytest.mark.slow
async def test_demoted_primary_keeps_no_subscription(http):
    """A manual failover leaves the old primary up (Sentinel demotes it seconds later, and a
    demoted primary still relays every publish to its subscribers): the subscription moves to the
    new primary as soon as the sentinels name it, not when the old node drops it, and the same
    socket keeps receiving. Here Sentinel is kept from ever demoting the old primary (an ACL denies
    it REPLICAOF, which fails the transaction that would also drop its clients), so only the
    service itself can have moved the subscription. Passwords on the data nodes (in the URL) and on the sentinels (their
    own setting)."""
    with SentinelTopology(replicas=1, password="data-secret", sentinel_password="sentinel-secret") as topo:
        env = topo.env()
        channel = f"{env['NOTIFY_REDIS_PREFIX']}:{{b}}:c"  # the broadcast stream's sharded channel
        with started(Replica(env)) as (a,):
            client = await Client.connect(a, "demoted")
            await client.welcome()
            first = await publish(http, a, "demoted", "before")
            assert first.status_code == 202
            assert [f["id"] for f in await client.notifications(1)] == [first.json()["id"]]
            old = topo.primary
            assert _subscribers(old, channel) == 1
            old.call("ACL", "SETUSER", "default", "-replicaof", "-slaveof")

            assert topo.sentinels[0].call("SENTINEL", "FAILOVER", topo.master_name)
            new = await asyncio.to_thread(topo.wait_promotion, old, 20)

            async def moved() -> bool:
                return _subscribers(new, channel) == 1 and _subscribers(old, channel) == 0

            moved_s = await wait_for(moved, 10)
            assert old.role() == "master", "Sentinel could not demote the old primary: the service moved by itself"
            await wait_for(lambda: is_ready(http, a), 10)
            response = await wait_for_202(http, a, "demoted", within=10)
            assert [f["id"] for f in await client.notifications(1)] == [response.json()["id"]]
            await client.nothing(0.3)
            assert not client.ws.close_code
            assert old.role() == "master", "the old primary stayed a primary throughout"
            report("sentinel_manual_failover", subscription_moved_after_promotion_s=moved_s, ready=True)
            await client.close()


@pytest.mark.slow
async def test_hung_primary_subscription_follows_the_switch(http):
    """The primary hangs (SIGSTOP: its connections stay open and silent, as when its host
    vanished): once the sentinels name the promoted replica, the subscription leaves the hung node
    without waiting for its probe (given 30 s here), and the same socket receives what follows."""
    with SentinelTopology(replicas=1) as topo:
        env = topo.env(NOTIFY_PROBE_TIMEOUT_SECONDS="30")
        with started(Replica(env)) as (a,):
            client = await Client.connect(a, "hung")
            await client.welcome()
            old = topo.primary
            old.pause()
            try:
                stopped_at = time.monotonic()
                await asyncio.to_thread(topo.wait_promotion, old, 20)
                promoted_at = time.monotonic()
                response = await wait_for_202(http, a, "hung", within=10)
                followed_s = time.monotonic() - promoted_at
                [frame] = await client.notifications(1)
                assert frame["id"] == response.json()["id"]
                assert await is_ready(http, a)
                assert followed_s < 10, "the probe's 30 s did not have to run out"
                assert not client.ws.close_code
                report(
                    "sentinel_hung_primary",
                    promotion_s=promoted_at - stopped_at,
                    delivered_after_promotion_s=followed_s,
                )
            finally:
                old.resume()
            await client.close()


@pytest.mark.slow
async def test_sentinels_down_at_start_are_waited_for(http):
    """No sentinel answers at start: the replica serves /healthz, answers 503 on /readyz and to
    publishes, and says why once in its log; the topology comes up: it is ready on its own, and
    delivers."""
    topo = SentinelTopology(replicas=1)
    try:
        with started(Replica(topo.env()), wait_ready=False) as (a,):
            for _ in range(3):
                assert not await is_ready(http, a)
                assert (await publish(http, a, "early", "too-soon")).status_code == 503
                await asyncio.sleep(0.3)
            lines = [line for line in a.output().splitlines() if "no sentinel names a primary" in line]
            assert len(lines) == 1, a.output()
            topo.start()
            ready_s = await wait_for(lambda: is_ready(http, a), 15)
            client = await Client.connect(a, "early")
            await client.welcome()
            response = await publish(http, a, "early", "in-time")
            assert response.status_code == 202
            assert (await client.notifications(1))[0]["id"] == response.json()["id"]
            report("sentinels_down_at_start", ready_after_topology_s=ready_s)
            await client.close()
    finally:
        topo.stop()
