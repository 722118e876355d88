"""Limits and abuse: per-user sockets, inbound frames, liveness, token expiry, backpressure,
publish rate, JWKS refetches, secrets in logs, and generated bad input (schemathesis, hypothesis).

Real replica processes and real sockets throughout; a raw socket client is used where a client
library would be too polite (never reading, never answering pings, invalid UTF-8).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server as http_server
import json
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import orjson
import psutil
import pytest
import redis
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from .rawhttp import metric
from .utils import ROOT, SECRET, TIMEOUT, Client, Replica, cluster_env, publish, publisher_headers, token

# Close codes docs/protocol.md lets a client see (1007: a text frame that is not UTF-8).
DOCUMENTED_CLOSE_CODES = {1000, 1007, 1009, 1011, 1012, 4008, 4029, 4401}


def report(name: str, **figures: Any) -> None:
    shown = (f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\nFIGURES {name}: " + ", ".join(shown))


@contextlib.contextmanager
def replica(env: dict[str, str] | None = None) -> Iterator[Replica]:
    r = Replica(env).start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def limited() -> Iterator[Replica]:
    """One embedded-broker replica with small limits and fast pings."""
    env = {
        "NOTIFY_MAX_CONNECTIONS_PER_USER": "3",
        "NOTIFY_PING_INTERVAL": "1",
        "NOTIFY_PING_TIMEOUT": "1",
        "NOTIFY_PUBLISH_RATE": "5",
    }
    with replica(env) as r:
        yield r


async def connection_count(http: httpx.AsyncClient, r: Replica) -> int:
    text = (await http.get(r.url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith("notify_connections "):
            return int(float(line.split()[1]))
    raise AssertionError("no notify_connections metric")


async def closed_with(client: Client, within: float = TIMEOUT) -> int | None:
    """Read until the server closes; the close code it sent."""
    with contextlib.suppress(websockets.ConnectionClosed):
        async with asyncio.timeout(within):
            while True:
                await client.ws.recv()
    return client.ws.close_code


# ---- a raw WebSocket client: it does only what a test tells it


class RawSocket:
    """A blocking TCP socket that completed a WebSocket handshake and then does nothing by itself:
    it answers no ping, reads nothing unless asked, and sends whatever bytes it is given."""

    def __init__(self, r: Replica, user: str = "raw", rcvbuf: int | None = None, query: str = "") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(("127.0.0.1", r.port))
        key = base64.b64encode(os.urandom(16)).decode()
        path = f"/ws?token={token(user)}" + (f"&{query}" if query else "")
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during handshake")
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        self.sock.sendall(self.frame(opcode, payload, fin))

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
        """A client's frame: masked, as RFC 6455 requires."""
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([(0x80 if fin else 0) | opcode])
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return header + mask + masked

    def read_until_close(self, timeout: float = TIMEOUT) -> tuple[int | None, list[bytes]]:
        """Read frames until a close frame or EOF: (close code or None on a bare EOF/reset, text payloads)."""
        texts: list[bytes] = []
        for opcode, payload in self.frames(timeout):
            if opcode == 0x8:
                return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005), texts
            if opcode == 0x1:
                texts.append(payload)
        return None, texts

    def frames(self, timeout: float) -> Iterator[tuple[int, bytes]]:
        """(opcode, payload) of each frame read within `timeout`, until EOF or a reset."""
        self.sock.settimeout(timeout)
        buffer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return
            if not chunk:
                return
            buffer += chunk
            while len(buffer) >= 2:
                opcode, n, offset = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
                if n == 126:
                    if len(buffer) < 4:
                        break
                    n, offset = struct.unpack("!H", buffer[2:4])[0], 4
                elif n == 127:
                    if len(buffer) < 10:
                        break
                    n, offset = struct.unpack("!Q", buffer[2:10])[0], 10
                if len(buffer) < offset + n:
                    break
                payload, buffer = buffer[offset : offset + n], buffer[offset + n :]
                yield opcode, payload

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# ---- sockets per user, inbound frames


async def test_connections_per_user_limit(limited, http):
    """The 4th socket of a user (limit 3) is closed with 4029; the other three keep working."""
    clients = [await Client.connect(limited, "capped") for _ in range(3)]
    for c in clients:
        await c.welcome()
    extra = await Client.connect(limited, "capped")
    assert await closed_with(extra) == 4029
    response = await publish(http, limited, "capped", "still-here")
    assert response.status_code == 202
    for c in clients:
        [frame] = await c.notifications(1)
        assert frame["id"] == response.json()["id"]
    other = await Client.connect(limited, "someone-else")
    await other.welcome()
    for c in [*clients, other]:
        await c.close()


async def test_inbound_frame_too_big_1009(limited):
    """A frame over NOTIFY_MAX_INBOUND_BYTES (4096) closes the socket with 1009."""
    client = await Client.connect(limited, "big")
    await client.welcome()
    await client.send(json.dumps({"type": "ping", "pad": "x" * 5000}))
    assert await closed_with(client) == 1009


async def test_inbound_rate_4029(limited):
    """More than NOTIFY_MAX_INBOUND_RATE (20) frames per second closes the socket with 4029;
    a client within the rate is answered every time."""
    polite = await Client.connect(limited, "polite")
    await polite.welcome()
    for _ in range(5):
        await polite.send({"type": "ping"})
        assert (await polite.recv())["type"] == "pong"
        await asyncio.sleep(0.1)
    chatty = await Client.connect(limited, "chatty")
    await chatty.welcome()
    with contextlib.suppress(websockets.ConnectionClosed):
        for _ in range(60):
            await chatty.send({"type": "ping"})
    assert await closed_with(chatty) == 4029
    await polite.send({"type": "ping"})
    assert (await polite.recv())["type"] == "pong"
    await polite.close()


# ---- liveness


def _answer_pings(raw: RawSocket, how: str, seconds: float) -> tuple[int, list[bytes], int | None]:
    """Answer every ping the replica sends for `seconds`, `how`: a whole pong in one write, `split` in
    two writes, `pipelined` in one write with an application ping behind it, or `wrong` (a pong with
    another payload). The pings answered, the text frames read meanwhile, and the close code if the
    replica closed the socket."""
    texts: list[bytes] = []
    pings = 0
    for opcode, payload in raw.frames(seconds):
        if opcode == 0x1:
            texts.append(payload)
        if opcode == 0x8:
            return pings, texts, struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
        if opcode != 0x9:
            continue
        pings += 1
        pong = raw.frame(0xA, payload if how != "wrong" else bytes(b ^ 0xFF for b in payload))
        if how == "split":
            raw.sock.sendall(pong[:3])
            time.sleep(0.05)
            raw.sock.sendall(pong[3:])
        elif how == "pipelined":
            raw.sock.sendall(pong + raw.frame(0x1, b'{"type":"ping"}'))
        else:
            raw.sock.sendall(pong)
    return pings, texts, None


async def test_a_pong_whole_split_or_pipelined_keeps_a_socket_and_a_wrong_one_does_not(limited, http):
    """The replica pings every second and waits 1 s for the pong. A client that answers each ping
    with a pong in one write, or split over two writes, or followed in the same write by a frame of
    its own (answered too), stays through three pings; one whose pongs carry the wrong payload is
    closed with 1011 like a peer that answers nothing."""
    baseline = await connection_count(http, limited)
    sockets = {how: RawSocket(limited, f"pong-{how}") for how in ("whole", "split", "pipelined", "wrong")}
    try:
        answers = {how: asyncio.to_thread(_answer_pings, raw, how, 3.6) for how, raw in sockets.items()}
        ends = dict(zip(answers, await asyncio.gather(*answers.values()), strict=True))
        pings, _, closed = ends["wrong"]
        assert (pings, closed) == (1, 1011), ends["wrong"]
        for how in ("whole", "split", "pipelined"):
            pings, _, closed = ends[how]
            assert pings >= 3 and closed is None, (how, ends[how])
        assert await connection_count(http, limited) == baseline + 3
        pongs = [t for t in ends["pipelined"][1] if orjson.loads(t)["type"] == "pong"]
        assert len(pongs) == ends["pipelined"][0], ends["pipelined"]
    finally:
        for raw in sockets.values():
            raw.close()


async def test_pings_keep_their_interval_when_the_timeout_is_longer():
    """NOTIFY_PING_INTERVAL=0.5 with NOTIFY_PING_TIMEOUT=5: a socket that answers is pinged every
    half second (not every timeout, nor every interval rounded up to the next tick of the clock
    pings run on), and one that never answers is closed with 1011 once its first ping is 5 s old."""
    with replica({"NOTIFY_PING_INTERVAL": "0.5", "NOTIFY_PING_TIMEOUT": "5"}) as r:
        answering, silent = RawSocket(r, "keeps-time"), RawSocket(r, "falls-silent")
        try:
            started = time.monotonic()

            async def silence() -> tuple[int | None, float]:
                code, _ = await asyncio.to_thread(silent.read_until_close, 9)
                return code, time.monotonic() - started

            (pings, _, closed), (code, after) = await asyncio.gather(
                asyncio.to_thread(_answer_pings, answering, "whole", 3.1), silence()
            )
            assert closed is None and 5 <= pings <= 7, pings
            assert code == 1011 and 5.0 <= after <= 7.5, (code, after)
        finally:
            answering.close()
            silent.close()


async def test_vanished_peer_is_freed_by_ping(limited, http):
    """A peer that stops answering the server's pings (a phone gone in a tunnel) is freed within
    ping interval + timeout (1 s + 1 s here); a peer that answers stays."""
    baseline = await connection_count(http, limited)
    live = await Client.connect(limited, "alive")
    await live.welcome()
    ghost = RawSocket(limited, "ghost")
    await asyncio.sleep(0.3)
    assert await connection_count(http, limited) == baseline + 2
    started = time.monotonic()
    deadline = started + 8
    while await connection_count(http, limited) > baseline + 1 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    freed_s = time.monotonic() - started
    assert await connection_count(http, limited) == baseline + 1, "the ghost was never freed"
    code, _ = ghost.read_until_close(2)
    assert code in (1011, None)
    await asyncio.sleep(1.5)
    await live.send({"type": "ping"})
    assert (await live.recv())["type"] == "pong", "a client that answers pings stays"
    report("ping_liveness", ping_interval=1.0, ping_timeout=1.0, ghost_freed_after_s=freed_s)
    ghost.close()
    await live.close()


async def test_token_expiry_closes_4401(limited):
    """A socket whose token expires is closed with 4401 at `exp`."""
    url = f"{limited.ws_url}?token={token('short', ttl=2)}"
    client = Client(await websockets.connect(url))
    welcome = await client.welcome()
    started = time.time()
    assert await closed_with(client, 6) == 4401
    assert time.time() >= welcome["expires_at"] - 0.05
    assert time.time() - started < 4


async def test_refresh_extends_the_socket(limited):
    """A refresh frame with a new token for the same sub, sent before `exp`, keeps the socket open
    past the first `exp`; a token for another user is refused with an error frame."""
    url = f"{limited.ws_url}?token={token('renew', ttl=2)}"
    client = Client(await websockets.connect(url))
    await client.welcome()
    await client.send({"type": "refresh", "token": token("someone-else", ttl=60)})
    assert (await client.recv())["code"] == "invalid_token"
    await client.send({"type": "refresh", "token": token("renew", ttl=4)})
    refreshed = await client.recv()
    assert refreshed["type"] == "refreshed"
    await asyncio.sleep(2.5)  # past the first exp
    await client.send({"type": "ping"})
    assert (await client.recv())["type"] == "pong"
    assert await closed_with(client, 5) == 4401  # at the new exp


# ---- publish rate, user ids


async def test_publish_rate_429_with_retry_after(limited, http):
    """Over NOTIFY_PUBLISH_RATE (5/s) per publisher `sub`: 429 with Retry-After; another publisher is unaffected."""
    statuses = []
    for i in range(12):
        response = await publish(http, limited, "rated", "e", i, headers=publisher_headers("busy-backend"))
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"] == "rate_limited"
    assert statuses[:5] == [202] * 5 and 429 in statuses
    other = await publish(http, limited, "rated", "e", headers=publisher_headers("quiet-backend"))
    assert other.status_code == 202


async def test_glob_characters_are_ordinary_user_ids(pair, http):
    """Users named `a*`, `a?`, `[ab]`, `*` get their own notifications only, across replicas."""
    a, b = pair
    names = ["a*", "a?", "[ab]", "*", "ab", "a\\*"]
    clients = {}
    for i, name in enumerate(names):
        clients[name] = await Client.connect(a if i % 2 else b, name)
        await clients[name].welcome()
    for i, name in enumerate(names):
        response = await http.post(
            f"{(b if i % 2 else a).url}/notify/{quote(name, safe='')}",
            json={"event": "glob", "data": name},
            headers=publisher_headers(),
        )
        assert response.status_code == 202, (name, response.text)
    for name in names:
        [frame] = await clients[name].notifications(1)
        assert frame["data"] == name
        await clients[name].nothing(0.2)
    for c in clients.values():
        await c.close()


async def test_invalid_user_ids(limited, http):
    """A sub with whitespace or a control character closes with 4401; 257 characters too; the REST API says 422."""
    for bad in ["has space", "tab\t", "ctl\x01", "x" * 257]:
        ws = await websockets.connect(f"{limited.ws_url}?token={token(bad)}")
        assert await closed_with(Client(ws)) == 4401
    response = await http.post(limited.url + "/notify/has%20space", json={"event": "e"}, headers=publisher_headers())
    assert response.status_code == 422
    ok = await Client.connect(limited, "é-ü-" + "x" * 250)
    await ok.welcome()
    await ok.close()


# ---- secrets never logged


@pytest.mark.parametrize("as_json", ["true", "false"])
async def test_tokens_never_reach_the_log(as_json, http):
    """At info level, a replica logs the socket handshakes and HTTP requests: no token appears,
    whether it came in the query string, a header, or a refused connection."""
    env = {"NOTIFY_LOG_LEVEL": "info", "NOTIFY_LOG_JSON": as_json}
    with replica(env) as r:
        secrets_used = []
        good = token("logged-user")
        secrets_used.append(good)
        ws = await websockets.connect(f"{r.ws_url}?token={good}")
        await ws.recv()
        await ws.close()
        expired = token("logged-user", ttl=-10)
        secrets_used.append(expired)
        ws = await websockets.connect(f"{r.ws_url}?token={expired}&since=1-1")
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.recv()
        garbage = "not.a.jwt-" + "s3cr3t" * 5
        secrets_used.append(garbage)
        with contextlib.suppress(Exception):
            async with websockets.connect(f"{r.ws_url}?access_token={garbage}&token={garbage}") as ws:
                await ws.recv()
        reader = token("logged-user", "notify:read")
        secrets_used.append(reader)
        await http.get(f"{r.url}/me/notifications?token={reader}")
        await http.get(f"{r.url}/me/notifications", headers={"Authorization": f"Bearer {reader}"})
        await http.get(f"{r.url}/nope?token={reader}")
        headers = publisher_headers()
        secrets_used.append(headers["Authorization"].split()[1])
        await publish(http, r, "logged-user", headers=headers)
        await asyncio.sleep(0.3)
        log = await asyncio.to_thread(Path(r.log.name).read_text, errors="replace")
        assert "/ws" in log and "/me/notifications" in log, "the test must see the lines it checks"
        for secret in secrets_used:
            assert secret not in log
            assert secret.split(".")[-1] not in log  # not even the signature
        assert SECRET not in log


# ---- the access log


def _access_lines(r: Replica) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in Path(r.log.name).read_text(errors="replace").splitlines() if line[:1] == "{")
    return [line for line in lines if line["logger"] == "service.access"]


@pytest.mark.parametrize("mode", ["summary", "summary, slow 1 us", "all", "off"])
async def test_access_log_modes(mode, http):
    """NOTIFY_ACCESS_LOG at info level, 20 publishes answered on the fast path, one by the
    framework (it has an Origin), a 422, a 401 and a GET:
    - summary (the default): no line for a successful publish quicker than
      NOTIFY_ACCESS_LOG_SLOW_SECONDS, but a summary line counting them (with p50/p99/max); a line
      for each failure and for the GET;
    - summary with the slow threshold at 1 us: every publish is slow, so each gets its line;
    - all: a line for each request; off: none.
    In every mode every response carries X-Request-ID (the caller's when given), every line
    written about a request carries it (a 202's names its notification), and no token appears."""
    env = {"NOTIFY_LOG_LEVEL": "info", "NOTIFY_ACCESS_LOG_SUMMARY_SECONDS": "0.5"}
    if mode == "summary, slow 1 us":
        env["NOTIFY_ACCESS_LOG_SLOW_SECONDS"] = "0.000001"
    elif mode != "summary":
        env["NOTIFY_ACCESS_LOG"] = mode
    headers = publisher_headers()
    with replica(env) as r:
        answers: dict[str, httpx.Response] = {}
        for i in range(20):
            answers[f"fast-{i}"] = await http.post(
                f"{r.url}/notify/logged", json={"event": "e"}, headers={**headers, "X-Request-ID": f"fast-{i}"}
            )
        answers["framework"] = await http.post(
            f"{r.url}/notify/logged",
            json={"event": "e"},
            headers={**headers, "Origin": "https://app.example", "X-Request-ID": "framework"},
        )
        answers["invalid"] = await http.post(
            f"{r.url}/notify/logged", json={"data": 1}, headers={**headers, "X-Request-ID": "invalid"}
        )
        answers["no-token"] = await http.post(
            f"{r.url}/notify/logged", json={"event": "e"}, headers={"X-Request-ID": "no-token"}
        )
        answers["read"] = await http.get(
            f"{r.url}/me/notifications?token={token('logged', 'notify:read')}", headers={"X-Request-ID": "read"}
        )
        anonymous = await http.post(f"{r.url}/notify/logged", json={"event": "e"}, headers=headers)
        assert [a.status_code for a in answers.values()] == [202] * 21 + [422, 401, 200]
        for rid, answer in answers.items():
            assert answer.headers["x-request-id"] == rid
        assert len(anonymous.headers["x-request-id"]) == 16  # made by the replica
        published = {rid: answers[rid].json()["id"] for rid in answers if rid.startswith("fast") or rid == "framework"}

        summaries: list[dict[str, Any]] = []
        lines: list[dict[str, Any]] = []
        for _ in range(40):  # the summary comes at the end of its period
            await asyncio.sleep(0.1)
            lines = _access_lines(r)
            summaries = [line for line in lines if "publishes" in line]
            if mode == "off" or summaries:
                break
        by_rid = {line["request_id"]: line for line in lines if "request_id" in line}
        assert len(by_rid) == len(lines) - len(summaries), "a request's line without its request id, or two"
        every_publish = mode in ("all", "summary, slow 1 us")
        if mode == "off":
            assert lines == []
        else:
            assert {"invalid", "no-token", "read"} <= set(by_rid)
            assert by_rid["invalid"]["status"] == 422 and by_rid["no-token"]["status"] == 401
            assert "[redacted]" in by_rid["read"]["path"]
            logged = {rid for rid in published if rid in by_rid}
            assert logged == (set(published) if every_publish else set()), logged
            for rid in logged:
                assert by_rid[rid]["notification_id"] == published[rid] and by_rid[rid]["status"] == 202
        if mode.startswith("summary"):
            [summary] = summaries
            assert "request_id" not in summary
            if every_publish:
                assert summary["publishes"] == 0 and summary["slow_logged"] == 22
            else:
                assert summary["publishes"] == 22 and summary["by_kind"] == {"user": 22}
                assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
            assert summary["failed_logged"] == 2
        else:
            assert summaries == []
        log = await asyncio.to_thread(Path(r.log.name).read_text, errors="replace")
        assert headers["Authorization"].split()[1] not in log


# ---- JWKS


class _Jwks(http_server.BaseHTTPRequestHandler):
    body = b"{}"
    hits: list[float] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, rsa.RSAPrivateKey, type[_Jwks]]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}).encode()
    handler = type("Jwks", (_Jwks,), {"body": body, "hits": []})
    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", key, handler
    server.shutdown()
    server.server_close()


async def test_jwks_refetch_is_rate_limited(jwks_server, http):
    """200 tokens with unknown `kid`s in 3 s cost at most one JWKS fetch per NOTIFY_JWKS_MIN_REFRESH_SECONDS;
    a token from the JWKS key works, and a `jku` header pointing elsewhere is ignored."""
    url, key, handler = jwks_server
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with replica({"NOTIFY_JWKS_URL": url, "NOTIFY_JWKS_MIN_REFRESH_SECONDS": "2"}) as r:
        valid = jwt.encode(
            {"sub": "jwks-user", "exp": int(time.time()) + 60, "scope": "notify:read"},
            key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        response = await http.get(r.url + "/me/notifications", headers={"Authorization": f"Bearer {valid}"})
        assert response.status_code == 200, response.text
        publisher = jwt.encode(
            {"sub": "jwks-svc", "exp": int(time.time()) + 60, "scope": "notify:publish"},
            key,
            algorithm="RS256",
            headers={"kid": "k1"},
        )
        # The first publish with a new JWKS token waits for its key; the second finds it verified.
        ids = []
        for _ in range(2):
            published = await http.post(
                r.url + "/notify/jwks-user", json={"event": "e"}, headers={"Authorization": f"Bearer {publisher}"}
            )
            assert published.status_code == 202, published.text
            ids.append(published.json()["id"])
        assert ids[0] != ids[1]
        handler.hits.clear()
        started = time.monotonic()
        statuses = []
        for i in range(200):
            forged = jwt.encode(
                {"sub": "x", "exp": int(time.time()) + 60, "scope": "notify:read"},
                attacker,
                algorithm="RS256",
                headers={"kid": f"unknown-{i}", "jku": url + "?evil"},
            )
            statuses.append(
                (await http.get(r.url + "/me/notifications", headers={"Authorization": f"Bearer {forged}"})).status_code
            )
            await asyncio.sleep(0.015)
        elapsed = time.monotonic() - started
        assert set(statuses) == {401}
        assert len(handler.hits) <= elapsed / 2 + 1, (len(handler.hits), elapsed)
        response = await http.get(r.url + "/me/notifications", headers={"Authorization": f"Bearer {valid}"})
        assert response.status_code == 200
        report("jwks", unknown_kid_tokens=200, seconds=elapsed, fetches=len(handler.hits))


# ---- backpressure


async def test_a_reader_that_pauses_then_reads_again_gets_everything(http):
    """A socket that stops reading until the server has to wait for room to write (9 MB sent to it,
    more than the kernel's buffers hold), then reads again: every notification arrives, in order,
    and the socket stays open; the send that had to wait is finished and the backlog written."""
    with replica({"NOTIFY_SEND_QUEUE_BYTES": str(64 << 20)}) as r:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.connect(("127.0.0.1", r.port))
        sock.setblocking(False)
        client = await Client.connect(r, "pauser", sock=sock, max_queue=1)  # reads nothing meanwhile
        await client.welcome()
        blob = "x" * 60_000
        sent = []
        for n in range(150):
            response = await publish(http, r, "pauser", "big", {"n": n, "blob": blob})
            assert response.status_code == 202
            sent.append(response.json()["id"])
        got = await client.notifications(len(sent), timeout=6 * TIMEOUT)
        assert [f["id"] for f in got] == sent
        assert client.ws.close_code is None
        await client.close()


@pytest.mark.slow
async def test_slow_consumer_4008_others_lose_nothing(redis_server, http):
    """A reader that never reads while 10 MB is published to it is cut off (4008, or its TCP
    aborted); 100 other users, published to at full rate meanwhile, lose nothing; the replica's
    RSS stays bounded and the stuck socket's resources are freed."""
    env = cluster_env(redis_server)
    with replica(env) as r:
        proc = psutil.Process(r.proc.pid)  # type: ignore[union-attr]
        others = [await Client.connect(r, f"fast{i}") for i in range(100)]
        for c in others:
            await c.welcome()
        stuck = RawSocket(r, "stuck", rcvbuf=8192)
        await asyncio.sleep(0.2)
        rss_before = proc.memory_info().rss
        before = await connection_count(http, r)
        blob = "x" * 60_000
        sent: dict[str, list[str]] = {f"fast{i}": [] for i in range(100)}
        received: dict[str, list[str]] = {u: [] for u in sent}

        async def read(user: str, c: Client) -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(60):
                    while True:
                        frame = orjson.loads(await c.ws.recv())
                        if frame["type"] == "notification":
                            received[user].append(frame["id"])
                            if frame.get("data") == "last":
                                return

        readers = [asyncio.create_task(read(f"fast{i}", c)) for i, c in enumerate(others)]
        rss_peak = rss_before
        big_published = 0

        async def flood() -> None:
            nonlocal big_published, rss_peak
            for _ in range(175):  # 175 x 60 kB = 10.5 MB for the reader that never reads
                response = await publish(http, r, "stuck", "big", blob)
                assert response.status_code == 202
                big_published += len(blob)
                rss_peak = max(rss_peak, proc.memory_info().rss)

        async def steady() -> None:
            for round_ in range(20):
                await asyncio.gather(*(_publish_ok(http, r, user, round_, sent) for user in sent))

        await asyncio.gather(flood(), steady())
        await asyncio.gather(*(_publish_ok(http, r, user, "last", sent) for user in sent))
        await asyncio.gather(*readers)
        lost = sum(len(set(sent[u]) - set(received[u])) for u in sent)
        assert lost == 0
        assert all(received[u] == sent[u] for u in sent)

        metrics = (await http.get(r.url + "/metrics")).text
        assert "notify_slow_consumers_total 1.0" in metrics
        deadline = time.monotonic() + 10
        while await connection_count(http, r) > before - 1 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        freed = await connection_count(http, r) == before - 1
        code, _ = stuck.read_until_close(5)
        stuck.close()
        rss_growth = (rss_peak - rss_before) / 1e6
        report(
            "backpressure",
            published_to_stuck_mb=big_published / 1e6,
            close_code=code,
            others=len(sent),
            other_notifications=sum(map(len, sent.values())),
            lost=lost,
            rss_before_mb=rss_before / 1e6,
            rss_peak_growth_mb=rss_growth,
            stuck_socket_freed=freed,
        )
        assert code in (4008, None)
        assert freed, "the stuck socket is still registered on the replica"
        assert rss_growth < 40, f"RSS grew by {rss_growth:.1f} MB"
        for c in others:
            await c.close()


async def _publish_ok(http: httpx.AsyncClient, r: Replica, user: str, data: Any, sent: dict[str, list[str]]) -> None:
    response = await publish(http, r, user, "steady", data)
    assert response.status_code == 202, response.text
    sent[user].append(response.json()["id"])


# ---- generated input


def _utf8(payload: bytes) -> bool:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.slow
def test_schemathesis_no_5xx(pair):
    """schemathesis, positive and negative generation against openapi/openapi.json, with a valid
    service token, against a real replica on Redis: no 5xx."""
    import requests
    import schemathesis

    a, _ = pair
    schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")
    auth = publisher_headers("fuzzer", "notify:publish notify:read")
    tried = 0
    statuses: dict[int, int] = {}
    failures: list[str] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal tried
                op = case.operation
                tried += 1
                given_headers = case.headers or {}
                # A valid service token always: generated ones would only ever test the 401 path.
                headers = {k: v for k, v in given_headers.items() if k.lower() != "authorization"} | auth
                try:
                    read_timeout = 0.5 if op.path == "/events" else 10  # an event stream stays open
                    response = case.call(base_url=a.url, headers=headers, timeout=(3, read_timeout))
                except requests.exceptions.ReadTimeout:
                    assert op.path == "/events", f"{op.method} {op.path} hung"  # an open event stream
                    return
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code >= 500:
                    failures.append(f"{op.method.upper()} {op.path} -> {response.status_code}: {response.text[:200]}")

            try:
                run()
            except Unsatisfiable:  # e.g. no way to break a request without parameters
                continue
    report("schemathesis", cases=tried, server_errors=len(failures), statuses=str(sorted(statuses.items())))
    print("\n".join(failures[:10]))
    assert statuses.get(202, 0) and statuses.get(200, 0), "valid requests must get through too"
    assert not failures, failures[:10]


@pytest.mark.slow
async def test_generated_client_frames(limited):
    """Hypothesis-generated frames (JSON of every shape, deep nesting, binary, invalid UTF-8, huge,
    fragmented): the replica never crashes, every close code is documented, and an unrelated
    socket keeps working all along."""
    bystander = await Client.connect(limited, "bystander")
    await bystander.welcome()
    codes: dict[int | None, int] = {}
    tried = 0

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)
        | st.floats(allow_nan=False)
        | st.text(max_size=50),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
        max_leaves=30,
    )
    frames = st.one_of(
        json_values.map(lambda v: (0x1, orjson.dumps(v))),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["ping", "ack", "refresh", "x", ""])},
            optional={
                "id": st.text(max_size=30) | st.integers(-(2**63), 2**63 - 1),
                "token": st.text(max_size=50) | st.none(),
            },
        ).map(lambda v: (0x1, orjson.dumps(v))),
        st.integers(1, 3000).map(lambda depth: (0x1, b"[" * depth + b"]" * depth)),
        st.binary(max_size=200).map(lambda b: (0x2, b)),
        st.binary(max_size=50).map(lambda b: (0x1, b"\xff\xfe" + b)),  # never valid UTF-8
        st.integers(4097, 70_000).map(lambda n: (0x1, b'{"type":"ping","p":"' + b"y" * n + b'"}')),
        st.just((0x1, b"")),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(batch=st.lists(frames, min_size=1, max_size=4))
    def run(batch: list[tuple[int, bytes]]) -> None:
        nonlocal tried
        raw = RawSocket(limited, "fuzzed")
        try:
            for opcode, payload in batch:
                tried += 1
                with contextlib.suppress(OSError):
                    raw.send_frame(opcode, payload)
            with contextlib.suppress(OSError):
                raw.send_frame(0x8, struct.pack("!H", 1000))
            code, _ = raw.read_until_close(3)
        finally:
            raw.close()
        codes[code] = codes.get(code, 0) + 1
        assert code is None or code in DOCUMENTED_CLOSE_CODES, code
        if code is None:
            # Only a fatal frame (over the size limit, or text that is not UTF-8) makes the server
            # drop the connection while the client is still sending: its close frame may be lost to
            # the reset that the client's next bytes cause.
            assert any(len(p) > 4096 or (o == 0x1 and not _utf8(p)) for o, p in batch), batch

    await asyncio.to_thread(run)
    limited.wait("/healthz")
    await bystander.send({"type": "ping"})
    assert (await bystander.recv())["type"] == "pong"
    await bystander.close()
    report("client_frames", frames=tried, close_codes=str(sorted(codes.items(), key=str)))


async def test_publish_rate_buckets_do_not_grow_with_every_publisher(limited, http):
    """Each publisher is held to NOTIFY_PUBLISH_RATE by a bucket of its own, kept only while it could
    still limit: 300 distinct publishers, then a quiet second, and next to none are held."""

    async def publish_as(publisher: str) -> int:
        return (await publish(http, limited, "many", "e", headers=publisher_headers(publisher))).status_code

    for start in range(0, 300, 50):
        statuses = await asyncio.gather(*(publish_as(f"backend-{i}") for i in range(start, start + 50)))
        assert statuses == [202] * 50
    assert "notify_publish_rate_buckets " in (await http.get(limited.url + "/metrics")).text
    # A bucket refills within a second (its burst is the rate): from then on it is dropped.
    held = None
    for attempt in range(100):
        assert await publish_as(f"late-{attempt}") == 202
        held = await metric(http, limited, "notify_publish_rate_buckets")
        if held <= 2:
            break
        await asyncio.sleep(0.1)
    assert held is not None and held <= 2


async def test_frames_held_for_a_socket_being_opened_count_as_dropped_when_it_is_cut_off(own_redis, http):
    """Live frames wait while a new socket is being registered (its welcome comes first); if more
    pile up than NOTIFY_SEND_QUEUE_FRAMES (2), the socket is cut off as a slow consumer and every
    frame it lost is counted in notify_notifications_dropped_total{reason="slow_consumer"}: the 3
    broadcasts held, not the 2 streams they were held in.

    The registration is kept waiting for real: replica A acknowledges publishes with WAIT on its
    shared Redis connection (NOTIFY_REDIS_REPLICAS_ACK=1, and no Redis replica answers), so the
    new socket's cursor read queues behind a WAIT in flight, while replica B broadcasts."""
    env = cluster_env(own_redis)
    env_a = {
        **env,
        "NOTIFY_REDIS_REPLICAS_ACK": "1",
        "NOTIFY_PUBLISH_TIMEOUT_SECONDS": "4",  # a WAIT holds A's shared connection for 3.2 s
        "NOTIFY_PROBE_TIMEOUT_SECONDS": "60",  # the cursor read waits it out
        "NOTIFY_SEND_QUEUE_FRAMES": "2",
    }
    dropped = 'notify_notifications_dropped_total{reason="slow_consumer"}'
    channel = f"{env['NOTIFY_REDIS_PREFIX']}:{{u:joiner}}:c"
    direct = redis.Redis(port=own_redis.port, decode_responses=True, socket_timeout=TIMEOUT)
    with replica(env_a) as a, replica(env) as b:
        before = await metric(http, a, dropped)

        async def waiting() -> bool:
            return any(c["cmd"] == "wait" for c in direct.client_list())

        async def subscribed() -> bool:
            return int(direct.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1]) == 1

        async def cut_off() -> bool:
            return await metric(http, a, "notify_slow_consumers_total") == 1

        acknowledged = asyncio.create_task(publish(http, a, "nobody", "held-up"))
        await _until(waiting)
        connecting = asyncio.create_task(Client.connect(a, "joiner"))
        await _until(subscribed)  # the socket is registered; its welcome waits behind the WAIT
        for i in range(3):
            assert (await publish(http, b, None, "e", i)).status_code == 202
        await _until(cut_off)
        assert await metric(http, a, dropped) - before == 3
        await acknowledged
        with contextlib.suppress(Exception):
            await (await connecting).close()
    direct.close()


async def _until(check: Callable[[], Awaitable[bool]], within: float = 3 * TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
