"""Direct exposure: slow and silent connections, request heads too large or not HTTP, against
real replicas on raw sockets (ceilings: test_ceilings.py; bodies: test_bodies.py).

Each test does what a careless or hostile client would do and checks what every client sees: the
answer (status, JSON error, Retry-After), when the connection closes, and that well-behaved
sockets and publishers beside it are not disturbed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Iterator

import httpx
import orjson
import psutil
import pytest
import websockets

from .rawhttp import SLACK, exchange, head, metric, report
from .utils import ROOT, TIMEOUT, Client, Replica, cluster_env, publish, publisher_headers, running, token

WS_HEADERS = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")


@pytest.fixture(scope="module")
def quick() -> Iterator[Replica]:
    """A replica whose connections get one second to send a request head."""
    with running({"NOTIFY_HEADER_TIMEOUT_SECONDS": "1"}) as r:
        yield r


# ---- the header timeout


async def test_partial_heads_get_408_and_silent_connections_are_closed(quick, http):
    """With NOTIFY_HEADER_TIMEOUT_SECONDS=1: a connection that sends nothing is closed without a
    word; one that sent part of a head (a publish for the fast path, a batch for the framework, an
    event stream, a WebSocket handshake, or one that keeps adding a header line) gets 408 in the
    service's error shape, then is closed; all within the timeout plus slack, none before it."""
    auth = f"Authorization: Bearer {token('backend', 'notify:publish')}"
    partial = {
        "fast publish": head("POST", "/notify/someone", auth, "Content-Type: application/json"),
        "batch": head("POST", "/notify", auth),
        "event stream": head("GET", f"/events?token={token('someone')}"),
        "websocket": head("GET", f"/ws?token={token('someone')}", *WS_HEADERS),
    }
    timeouts_before = await metric(http, quick, 'notify_header_timeouts_total{kind="partial"}')
    silent_before = await metric(http, quick, 'notify_header_timeouts_total{kind="silent"}')
    answers = await asyncio.gather(
        exchange(quick.port, b""),
        *(exchange(quick.port, data) for data in partial.values()),
        exchange(quick.port, head("GET", "/healthz"), trickle=[b"X-More: %d\r\n" % i for i in range(20)]),
    )
    silent, *partials, trickling = answers
    assert silent.raw == b"" and silent.closed_after is not None and 0.9 <= silent.closed_after <= 1 + SLACK
    for name, answer in zip([*partial, "one more header line every 0.3 s"], [*partials, trickling], strict=True):
        assert answer.status == 408, (name, answer.raw)
        assert answer.json()["error"] == "request_timeout", name
        assert answer.headers["connection"] == "close", name
        assert answer.closed_after is not None and 0.9 <= answer.closed_after <= 1 + SLACK, (name, answer.closed_after)
    assert await metric(http, quick, 'notify_header_timeouts_total{kind="partial"}') >= timeouts_before + 5
    assert await metric(http, quick, 'notify_header_timeouts_total{kind="silent"}') >= silent_before + 1
    report("header_timeout", timeout_s=1.0, closed_after_s=max(a.closed_after or 0 for a in answers))


async def closed_when_idle(
    port: int, pauses: tuple[float, ...], within: float, then: bytes = b""
) -> tuple[bytes, float]:
    """GET /healthz on one keep-alive connection once per pause, waiting that long after each answer,
    then `then` (the start of a head, say) and nothing more: what the connection still sent, and how
    long after the last answer it was closed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for pause in pauses:
            writer.write(head("GET", "/healthz") + b"\r\n")
            async with asyncio.timeout(TIMEOUT):
                response = await reader.readuntil(b"\r\n\r\n")
                assert response.startswith(b"HTTP/1.1 200"), response
                length = int(response.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            answered = time.monotonic()
            await asyncio.sleep(pause)
        writer.write(then)
        async with asyncio.timeout(within):
            rest = await reader.read()
        return rest, time.monotonic() - answered
    finally:
        writer.close()


async def test_header_clock_restarts_after_each_response(quick):
    """On a keep-alive connection each request's head gets the whole timeout from its first byte:
    requests every 0.5 s for 3 s (three timeouts) are all answered on the same connection, and a
    head begun 0.5 s after the last response and left unfinished is answered 408 a timeout later."""
    rest, waited = await closed_when_idle(quick.port, (0.5,) * 6, 1 + SLACK, then=b"GET /healthz HTTP/1.1\r\n")
    assert rest.startswith(b"HTTP/1.1 408"), rest
    assert 1.4 <= waited <= 1.5 + SLACK, waited


async def test_keep_alive_can_outlast_the_header_timeout():
    """Behind a balancer that keeps idle connections longer than the header timeout (AWS ALB: 60 s),
    NOTIFY_KEEP_ALIVE_SECONDS alone is raised. Header timeout 1 s, keep-alive 4 s: a request 2 s
    after a response is served on the same connection, an idle one is closed 4 s after its last
    response, and a head begun 2 s after a response still gets 408 one second after its first byte."""
    with running({"NOTIFY_HEADER_TIMEOUT_SECONDS": "1", "NOTIFY_KEEP_ALIVE_SECONDS": "4"}) as replica:
        (rest, waited), (slow, slow_waited) = await asyncio.gather(
            closed_when_idle(replica.port, (2.0, 0.0), 4 + SLACK),
            closed_when_idle(replica.port, (2.0,), 1 + SLACK, then=b"GET /healthz HTTP/1.1\r\nX-A: 1\r\n"),
        )
    assert rest == b"" and 3.9 <= waited < 4 + SLACK, (rest, waited)
    assert slow.startswith(b"HTTP/1.1 408"), slow
    assert 2.9 <= slow_waited < 3.5, slow_waited  # the keep-alive would close it at 4 s, silently


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(single, http):
    """The keep-alive timeout (5 s) kept on the header clock: a request 3 s after a response is
    served on the same connection (the clock armed for the first response does not cut it), and
    the connection left idle after the second response is closed without a word 5 s later, not at
    the header timeout (10 s) and not counted as one."""
    silent_before = await metric(http, single, 'notify_header_timeouts_total{kind="silent"}')
    rest, waited = await closed_when_idle(single.port, (3.0, 0.0), 5 + SLACK)
    assert rest == b""
    assert 4.9 <= waited < 8, waited  # the header timeout would be 10 s
    assert await metric(http, single, 'notify_header_timeouts_total{kind="silent"}') == silent_before


async def test_keep_alive_timeout_is_a_setting():
    """NOTIFY_KEEP_ALIVE_SECONDS moves the keep-alive timeout: an idle connection is closed that long
    after its response, while one that sends again before then is served."""
    with running({"NOTIFY_KEEP_ALIVE_SECONDS": "1.5"}) as replica:
        rest, waited = await closed_when_idle(replica.port, (1.0, 0.0), 1.5 + SLACK)
    assert rest == b""
    assert 1.4 <= waited < 4, waited  # the default would be 5 s


async def test_sockets_and_streams_outlive_the_header_timeout(quick, http):
    """The timeout is for request heads only: a WebSocket and an event stream opened on that
    replica still receive a notification published three timeouts later."""
    user = "long-lived"
    client = await Client.connect(quick, user)
    await client.welcome()
    async with http.stream("GET", f"{quick.url}/events?token={token(user)}") as stream:
        lines = stream.aiter_lines()
        async with asyncio.timeout(TIMEOUT):
            while "welcome" not in await anext(lines):
                pass
        await asyncio.sleep(3)
        sent = (await publish(http, quick, user, "late")).json()["id"]
        [frame] = await client.notifications(1)
        assert frame["id"] == sent
        async with asyncio.timeout(TIMEOUT):
            while sent not in await anext(lines):
                pass
    await client.close()


# ---- heads too large, malformed requests


async def test_oversized_handshakes_are_refused_at_once(single):
    """A WebSocket handshake with a 10 KB header line, or with 200 headers, is answered 431 with a
    JSON error within a second (it used to hang); so is any request whose head is over 64 KB, and a
    request that is not HTTP gets a JSON 400. A normal handshake still works afterwards."""
    ws = head("GET", f"/ws?token={token('big')}", *WS_HEADERS, "Sec-WebSocket-Version: 13")
    cases = {
        "websocket, 10 KB header line": ws + b"X-Big: " + b"a" * 10_000 + b"\r\n\r\n",
        "websocket, 200 headers": ws + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
        "http, 70 KB head": head("GET", "/healthz") + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(70)),
    }
    answered_after = []
    for name, data in cases.items():
        answer = await exchange(single.port, data)
        assert answer.status == 431, (name, answer.raw[:200])
        assert answer.json()["error"] == "headers_too_large", name
        assert answer.closed_after is not None and answer.closed_after < 1.0, (name, answer.closed_after)
        answered_after.append(answer.closed_after)
    report("oversized_heads", cases=len(cases), slowest_answer_s=max(answered_after))
    bad = await exchange(single.port, b"GET /healthz HTTP/1.1\r\nHost x\r\n\r\n")
    assert bad.status == 400 and bad.json()["error"] == "malformed_request", bad.raw
    client = await Client.connect(single, "big")
    await client.welcome()
    await client.close()


# ---- a WebSocket handshake on a keep-alive connection


async def test_handshake_after_a_publish_on_a_keep_alive_connection(single, http):
    """nginx reuses its keep-alive connections to a replica for WebSocket handshakes. A handshake
    on a connection that carried a publish (answered on the fast path) gets its 101 and welcome,
    and the publish before it is not published again (it was, once, with a new id and a 202 in
    front of the 101). One pipelined behind a publish still unanswered is not served: the
    connection closes, the publish is published once."""
    user = "keepalive-upgrade"
    auth = publisher_headers()["Authorization"]
    body = b'{"event":"e"}'
    post = head("POST", f"/notify/{user}", f"Authorization: {auth}", "Content-Type: application/json")
    post += b"Content-Length: %d\r\n\r\n" % len(body) + body
    upgrade = head("GET", f"/ws?token={token(user)}", *WS_HEADERS, "Sec-WebSocket-Version: 13") + b"\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", single.port)
    try:
        ids = []
        for _ in range(2):
            writer.write(post)
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.readuntil(b"}")
            assert answer.startswith(b"HTTP/1.1 202 "), answer
            ids.append(orjson.loads(answer.partition(b"\r\n\r\n")[2])["id"])
        writer.write(upgrade)
        async with asyncio.timeout(TIMEOUT):
            answer = await reader.readuntil(b"}")
        assert answer.startswith(b"HTTP/1.1 101 "), answer
        assert orjson.loads(answer[answer.index(b'{"type"') :])["cursor"] == ids[-1]
    finally:
        writer.close()
    pipelined = await exchange(single.port, post + upgrade)
    assert pipelined.raw == b"" and pipelined.closed_after is not None
    history = await http.get(f"{single.url}/users/{user}/notifications", headers=publisher_headers())
    assert len(history.json()["notifications"]) == 3, history.json()


# ---- the handshake rate


async def test_handshake_rate_paces_then_429_before_the_token_is_read(http):
    """NOTIFY_MAX_HANDSHAKE_RATE=5, one socket open: 30 handshakes at once (WebSockets and event
    streams, every one with a token that is no JWT). About a second's worth of them is held back and
    taken on one by one at the rate (they then meet their bad token: 4401 for a socket, 401 for a
    stream); the rest are answered 429 `too_many_handshakes` at once, with a Retry-After drawn
    between 1 s and a few, never an answer about their token. Refusals and holds are counted, the
    log says once that the rate was reached and once that it no longer is, the open socket
    receives throughout, and a second later a handshake is taken on at once."""
    rate = 5
    with running({"NOTIFY_MAX_HANDSHAKE_RATE": str(rate)}) as r:
        assert await metric(http, r, "notify_max_handshake_rate") == rate
        client = await Client.connect(r, "steady")
        await client.welcome()
        refused_before = await metric(http, r, 'notify_connections_refused_total{reason="max_handshake_rate"}')
        started = time.monotonic()

        async def socket_attempt() -> tuple[int, dict[str, str], bytes, float]:
            """101 (the socket opened; it is closed 4401 for its token), or the refusal; and when."""
            try:
                ws = await websockets.connect(f"{r.ws_url}?token=not-a-jwt", open_timeout=TIMEOUT)
            except websockets.InvalidStatus as exc:
                headers = {k.lower(): v for k, v in exc.response.headers.raw_items()}
                return exc.response.status_code, headers, bytes(exc.response.body or b""), time.monotonic() - started
            answered = time.monotonic() - started
            with contextlib.suppress(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4401, ws.close_code
            return 101, {}, b"", answered

        async def stream_attempt() -> tuple[int, dict[str, str], bytes, float]:
            response = await http.get(f"{r.url}/events?token=not-a-jwt")
            return response.status_code, dict(response.headers), response.content, time.monotonic() - started

        answers = await asyncio.gather(*(socket_attempt() for _ in range(24)), *(stream_attempt() for _ in range(6)))
        elapsed = time.monotonic() - started
        sent = (await publish(http, r, "steady", "during")).json()["id"]
        assert [f["id"] for f in await client.notifications(1)] == [sent]

        statuses = collections.Counter(status for status, *_ in answers)
        assert set(statuses) <= {101, 401, 429}, statuses
        taken = sorted(at for status, _, _, at in answers if status != 429)  # a bad token is refused after its turn
        refused_at = [at for status, _, _, at in answers if status == 429]
        # A second's worth and a tenth (at once), less the socket already open, plus what the rate let in meanwhile.
        assert 2 <= len(taken) <= rate * (1 + 0.1 + elapsed) + 1, (statuses, elapsed)
        assert taken[-1] >= (len(taken) - 2) / rate - 0.2, taken  # one by one, at the rate
        assert max(refused_at) < 0.5, refused_at  # refusals at once
        retry_after = []
        for status, headers, body, _ in answers:
            if status == 429:
                assert orjson.loads(body)["error"] == "too_many_handshakes"
                retry_after.append(int(headers["retry-after"]))
        assert len(retry_after) >= 20
        assert min(retry_after) >= 1 and max(retry_after) <= 30 and len(set(retry_after)) > 1, retry_after
        refused = await metric(http, r, 'notify_connections_refused_total{reason="max_handshake_rate"}')
        assert refused - refused_before == len(retry_after)
        assert await metric(http, r, "notify_handshakes_delayed_total") >= len(taken) - 1

        await asyncio.sleep(1.5)
        opened = time.monotonic()
        again = await Client.connect(r, "later")
        await again.welcome()
        assert time.monotonic() - opened < 0.5
        await again.close()
        await client.close()
        log = r.output()
        assert log.count(f"over NOTIFY_MAX_HANDSHAKE_RATE={rate}/s for more than a second") == 1, log
        assert log.count("handshakes are taken on at once again") == 1, log
        report(
            "handshake_rate",
            rate=rate,
            attempts=len(answers),
            taken=len(taken),
            last_taken_after_s=taken[-1],
            refused=len(refused_at),
            slowest_refusal_s=max(refused_at),
            retry_after=str(sorted(collections.Counter(retry_after).items())),
        )


async def test_by_default_a_burst_of_handshakes_is_not_paced_but_at_most_32_are_in_flight(http):
    """With the defaults (no NOTIFY_MAX_HANDSHAKE_RATE), 200 sockets connecting at once are all
    welcomed, none held back for a turn or refused 429: connects are bounded by what the replica
    can take, not by a rate. The limit of 32 handshakes in flight still applies."""
    with running() as r:
        assert await metric(http, r, "notify_max_handshake_rate") == 0  # 0: no cap
        clients = await asyncio.gather(*(Client.connect(r, f"burst{i}") for i in range(200)))
        try:
            welcomes = await asyncio.gather(*(c.welcome() for c in clients))
            assert len(welcomes) == 200
            assert await metric(http, r, "notify_handshakes_delayed_total") == 0
            assert await metric(http, r, 'notify_connections_refused_total{reason="max_handshake_rate"}') == 0
            peak = await metric(http, r, "notify_handshakes_in_flight_peak")
            assert 1 <= peak <= 32, peak
        finally:
            await asyncio.gather(*(c.close() for c in clients))


# ---- slow-loris against a working replica


def _fds(proc: psutil.Process, redis_port: int) -> int:
    """Descriptors other than connections to Redis (whose pool grows and shrinks by itself)."""
    to_redis = sum(1 for c in proc.net_connections("tcp") if c.raddr and c.raddr.port == redis_port)
    return proc.num_fds() - to_redis


@pytest.mark.slow
async def test_slowloris_and_silent_flood(redis_server):
    """1,000 slow-loris connections (a partial head, then one header line a second) and 1,000
    silent ones against one replica (header timeout 4 s) while a client socket receives and a
    backend publishes: publishes keep answering 202 at their usual latency, the socket receives
    everything, every attacking connection is closed within the timeout plus slack (slow ones
    with 408), and the replica's descriptors return to their baseline."""
    attackers = 1000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * attackers + 200:
        pytest.skip(f"the file-descriptor hard limit ({hard}) is too low for {2 * attackers} connections")
    timeout = 4.0
    env = cluster_env(redis_server, NOTIFY_HEADER_TIMEOUT_SECONDS=str(timeout))
    with running(env) as r:
        proc = psutil.Process(r.proc.pid)  # type: ignore[union-attr]
        client = await Client.connect(r, "victim")
        await client.welcome()
        received: list[str] = []

        async def receive() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frame = orjson.loads(await client.ws.recv())
                    if frame["type"] == "notification":
                        received.append(frame["id"])

        reader = asyncio.create_task(receive())
        sent: list[str] = []
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=httpx.Limits(max_connections=1)) as backend:

            async def timed_publish() -> float:
                started = time.perf_counter()
                response = await publish(backend, r, "victim", "tick")
                elapsed = time.perf_counter() - started
                assert response.status_code == 202, response.text
                sent.append(response.json()["id"])
                return elapsed

            for _ in range(20):
                await timed_publish()
            baseline = [await timed_publish() for _ in range(300)]
            fds_before = _fds(proc, redis_server.port)

            attack = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.slowloris",
                "--port",
                str(r.port),
                "--slow",
                str(attackers),
                "--silent",
                str(attackers),
                "--interval",
                "1",
                "--seconds",
                str(timeout + 4 * SLACK),
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            assert attack.stdout is not None
            async with asyncio.timeout(4 * SLACK):
                opened_line = (await attack.stdout.readline()).decode()
            assert opened_line.startswith("opened "), opened_line
            fds_peak = _fds(proc, redis_server.port)
            under_attack: list[float] = []
            attack_started = time.monotonic()
            while attack.returncode is None and time.monotonic() - attack_started < timeout + 4 * SLACK:
                under_attack.append(await timed_publish())
                if len(under_attack) % 50 == 0:
                    fds_peak = max(fds_peak, _fds(proc, redis_server.port))
            async with asyncio.timeout(2 * SLACK):
                summary = orjson.loads(await attack.stdout.read())
                await attack.wait()
            deadline = time.monotonic() + SLACK
            while _fds(proc, redis_server.port) != fds_before and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            fds_after = _fds(proc, redis_server.port)
        async with asyncio.timeout(TIMEOUT):
            while len(received) < len(sent):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        reader.cancel()
        await client.close()

    p50_base, p50_attack = statistics.median(baseline), statistics.median(under_attack)
    p90_base = statistics.quantiles(baseline, n=10)[-1]
    p90_attack = statistics.quantiles(under_attack, n=10)[-1]
    slow, silent = summary["slow"], summary["silent"]
    report(
        "slowloris",
        slow=slow["opened"],
        silent=silent["opened"],
        header_timeout_s=timeout,
        slow_closed_after_s_min=slow["min_held_s"],
        slow_closed_after_s_max=slow["max_held_s"],
        silent_closed_after_s_max=silent["max_held_s"],
        slow_answers=str(slow["answers"]),
        publish_p50_ms_baseline=p50_base * 1000,
        publish_p50_ms_attack=p50_attack * 1000,
        publish_p90_ms_baseline=p90_base * 1000,
        publish_p90_ms_attack=p90_attack * 1000,
        publishes_under_attack=len(under_attack),
        fds_before=fds_before,
        fds_peak=fds_peak,
        fds_after=fds_after,
    )
    assert summary["failed_to_open"] == 0
    assert slow["opened"] == silent["opened"] == attackers
    assert slow["closed"] == silent["closed"] == attackers, summary
    assert slow["answers"] == {"408": attackers} and silent["answers"] == {"none": attackers}
    assert slow["max_lines_sent"] >= 3, "the slow connections did trickle"
    for kind in (slow, silent):
        assert timeout - 0.2 <= kind["min_held_s"] and kind["max_held_s"] <= timeout + SLACK, summary
    assert fds_peak >= fds_before + 2 * attackers * 0.9, "the attack was not in place while publishing"
    assert len(under_attack) >= 100
    assert p50_attack <= 5 * p50_base, (p50_base, p50_attack)
    assert sorted(received) == sorted(sent), "the socket missed notifications"
    assert fds_after == fds_before, (fds_before, fds_after)


@pytest.mark.slow
async def test_a_burst_of_resumes_with_the_rate_uncapped_keeps_the_redis_pool(redis_server, http):
    """NOTIFY_MAX_HANDSHAKE_RATE=off and 300 sockets resuming at once, each reading its history as it
    is welcomed: every one gets what it missed and no Redis call fails, because at most 32 handshakes
    are in flight whatever the rate (every pending connection is accepted at once)."""
    with running(cluster_env(redis_server, NOTIFY_MAX_HANDSHAKE_RATE="off")) as a:
        users = [f"burst{i}" for i in range(300)]
        first = await asyncio.gather(*(publish(http, a, u, "missed", {"n": 1}) for u in users))
        second = await asyncio.gather(*(publish(http, a, u, "missed", {"n": 2}) for u in users))
        assert {r.status_code for r in first + second} == {202}
        clients = await asyncio.gather(
            *(Client.connect(a, u, f"since={r.json()['id']}") for u, r in zip(users, first, strict=True))
        )
        try:
            welcomes = await asyncio.gather(*(c.welcome() for c in clients))
            assert all(w.get("recovered") is True for w in welcomes), [w for w in welcomes if not w.get("recovered")][
                :3
            ]
            replayed = await asyncio.gather(*(c.notifications(1) for c in clients))
            assert [n[0]["id"] for n in replayed] == [r.json()["id"] for r in second]
            assert await metric(http, a, "notify_broker_errors_total") == 0
            peak = await metric(http, a, "notify_handshakes_in_flight_peak")
            report("handshakes_in_flight", sockets=len(clients), peak=peak)
            assert 1 < peak <= 32, peak  # they did overlap, and no more than 32 at once
        finally:
            await asyncio.gather(*(c.ws.close() for c in clients))
