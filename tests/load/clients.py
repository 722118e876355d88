"""The generator's clients: picows WebSockets for both protocols, and a raw HTTP/1.1 keep-alive publisher.

Everything here runs callbacks straight from the transport (no task per frame or per request), so
the generator spends a few microseconds per delivery and per POST and stays off the critical path.
"""

# Waits here are bounded polls with explicit deadlines, which is what a load generator wants.
# ruff: noqa: ASYNC109, ASYNC110

from __future__ import annotations

import asyncio
import collections
import time
from array import array
from collections.abc import Callable, Collection
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

perf = time.perf_counter


class Recorder:
    """What the sockets received, against what was published.

    A targeted notification carries `{"t": <publish time>, "k": <index>}` in its data, a broadcast
    or topic message `{"t": ..., "b": <index>}`; `t` is the time the generator meant to send the POST
    (perf_counter, same process), so a request held back by the generator still counts against the
    latency. A fan-out to a topic names its member sockets: one reaching any other socket is
    counted as misrouted, not as a delivery.
    """

    def __init__(self, sockets: int) -> None:
        self.sockets = sockets
        self.reset(0, 0)

    def reset(self, targeted: int, broadcasts: int, members: bytearray | None = None) -> int:
        """Start a run; frames of earlier runs (late, after an overload) are counted as stale, not as this run's.
        `members`: a flag per socket, those that should get the run's fan-outs (None: every socket)."""
        self.run = getattr(self, "run", 0) + 1
        self.stale = 0
        self.seen: list[set[int]] = [set() for _ in range(self.sockets)]
        self.user_of = array("i", [-1]) * targeted
        self.received = 0
        self.duplicates = 0
        self.misrouted = 0
        self.latency = array("d")
        self.first = self.last = 0.0
        self.b_count = array("i", [0]) * broadcasts
        self.b_last = array("d", [0.0]) * broadcasts
        self.b_seen = [bytearray(broadcasts) for _ in range(self.sockets)] if broadcasts else []
        self.members = members
        return self.run

    def record(self, sock: int, data: Any, now: float) -> None:
        if not isinstance(data, dict):
            return
        if data.get("r") != self.run:
            self.stale += 1
            return
        k = data.get("k")
        if k is not None:
            seen = self.seen[sock]
            if k in seen:
                self.duplicates += 1
                return
            seen.add(k)
            if k >= len(self.user_of) or self.user_of[k] != sock >> 1:
                self.misrouted += 1
            self.received += 1
            self.latency.append(now - data["t"])
            if not self.first:
                self.first = now
            self.last = now
            return
        b = data.get("b")
        if b is not None and b < len(self.b_count):
            if self.members is not None and not self.members[sock]:
                self.misrouted += 1
                return
            mark = self.b_seen[sock]
            if mark[b]:
                self.duplicates += 1
                return
            mark[b] = 1
            self.received += 1
            self.b_count[b] += 1
            self.b_last[b] = now - data["t"]  # arrivals only grow, so this ends as the last socket's


class _Base(WSListener):
    def __init__(self, fleet: Fleet, index: int, token: str) -> None:
        self.fleet = fleet
        self.index = index
        self.token = token
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None
        self.close_code: int | None = None
        self.topics: set[str] = set()  # joined: the server said so
        self.joining: dict[str, asyncio.Future[None]] = {}

    def join(self, topic: str) -> asyncio.Future[None]:
        """Ask to join a topic (a room); done when the server has answered that the socket is in."""
        future = self.joining[topic] = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, self.join_frame(topic))
        return future

    def join_frame(self, topic: str) -> bytes:
        raise NotImplementedError

    def joined(self, topic: str, refusal: str | None = None) -> None:
        future = self.joining.pop(topic, None)
        if future is None or future.done():
            return
        if refusal is None:
            self.topics.add(topic)
            future.set_result(None)
        else:
            future.set_exception(ConnectionRefusedError(refusal))

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.fleet.on_closed(self)
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({self.close_code})"))
        for future in self.joining.values():
            if not future.done():
                future.set_exception(ConnectionError(f"closed before joined ({self.close_code})"))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.on_text(transport, frame)
        elif frame.msg_type == WSMsgType.PING:  # only when the fleet counts pings (no auto pong then)
            self.fleet.pings += 1
            transport.send_pong(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    def on_text(self, transport: WSTransport, frame: WSFrame) -> None:
        raise NotImplementedError


class NotifyListener(_Base):
    """The service's protocol: `welcome`, then `notification` frames; `join` answered by `joined` (or an
    `error` naming the topic)."""

    def join_frame(self, topic: str) -> bytes:
        return orjson.dumps({"type": "join", "topic": topic})

    def on_text(self, transport: WSTransport, frame: WSFrame) -> None:
        now = perf()
        msg = orjson.loads(frame.get_payload_as_memoryview())
        kind = msg.get("type")
        if kind == "notification":
            self.fleet.recorder.record(self.index, msg.get("data"), now)
        elif kind == "welcome" and not self.ready.done():
            self.ready.set_result(None)
        elif kind == "joined":
            self.joined(msg.get("topic"))
        elif kind == "error" and msg.get("topic") is not None:
            self.joined(msg["topic"], f"{msg.get('code')}: {msg.get('message')}")


class SocketIOListener(_Base):
    """Engine.IO 4 / Socket.IO 5 over a bare WebSocket, as `socket.io-client` with transports=['websocket'].

    A join is the event `join` with the room's name and an ack, as `socket.emit("join", room, ack)`: the
    servers call `socket.join(room)` and acknowledge."""

    def __init__(self, fleet: Fleet, index: int, token: str) -> None:
        super().__init__(fleet, index, token)
        self.acks: dict[int, str] = {}  # ack id -> the room it answers for

    def join_frame(self, topic: str) -> bytes:
        ack = len(self.acks) + 1
        self.acks[ack] = topic
        return b"42" + str(ack).encode() + orjson.dumps(["join", topic])

    def on_text(self, transport: WSTransport, frame: WSFrame) -> None:
        payload = frame.get_payload_as_bytes()
        head = payload[:2]
        if head == b"42":
            now = perf()
            event = orjson.loads(payload[2:])
            if event[0] == "notification":
                self.fleet.recorder.record(self.index, event[1].get("data"), now)
        elif head == b"43":  # an ack: `43<id>[answer]`
            at = payload.index(b"[")
            topic = self.acks.get(int(payload[2:at]))
            answer = orjson.loads(payload[at:])
            if topic is not None:
                ok = bool(answer) and isinstance(answer[0], dict) and answer[0].get("ok") is True
                self.joined(topic, None if ok else payload.decode(errors="replace"))
        elif payload == b"2":  # engine.io ping
            transport.send(WSMsgType.TEXT, b"3")
        elif head[:1] == b"0":  # engine.io open: connect to the default namespace with the token
            transport.send(WSMsgType.TEXT, b"40" + orjson.dumps({"token": self.token}))
        elif head == b"40":
            if not self.ready.done():
                self.ready.set_result(None)
        elif head == b"44" and not self.ready.done():
            self.ready.set_exception(ConnectionRefusedError(payload.decode(errors="replace")))


class Fleet:
    """Sockets of one system; socket 2u+d is device d of user u."""

    def __init__(self, kind: str, users: int, devices: int = 2, count_pings: bool = False) -> None:
        self.kind = kind
        self.users = users
        self.devices = devices
        # The server's pings, counted by the sockets that answer them (picows answers them unseen else).
        self.count_pings = count_pings
        self.pings = 0
        self.listeners: list[_Base | None] = [None] * (users * devices)
        self.recorder = Recorder(users * devices)
        self.closed = 0
        self.close_codes: collections.Counter[int | None] = collections.Counter()

    def on_closed(self, listener: _Base) -> None:
        self.closed += 1
        self.close_codes[listener.close_code] += 1

    def url(self, port: int, token: str) -> str:
        if self.kind == "socketio":
            return f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        return f"ws://127.0.0.1:{port}/ws?token={token}"

    async def connect_one(self, index: int, port: int, token: str, timeout: float) -> None:
        cls = SocketIOListener if self.kind == "socketio" else NotifyListener
        async with asyncio.timeout(timeout):
            transport, listener = await ws_connect(
                lambda: cls(self, index, token),
                self.url(port, token),
                websocket_handshake_timeout=timeout,
                enable_auto_pong=not self.count_pings,
            )
            self.listeners[index] = listener
            await listener.ready

    async def connect_all(
        self, ports: Callable[[int], int], tokens: list[str], concurrency: int, timeout: float
    ) -> tuple[float, int]:
        """Open every socket with at most `concurrency` handshakes in flight; (seconds, failures)."""
        sem = asyncio.Semaphore(concurrency)
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            async with sem:
                try:
                    await self.connect_one(i, ports(i), tokens[i], timeout)
                except (OSError, TimeoutError, ConnectionError, Exception):  # noqa: BLE001 - counted
                    failures += 1

        started = perf()
        await asyncio.gather(*(one(i) for i in range(len(self.listeners))))
        return perf() - started, failures

    async def join_all(
        self, topic: str, concurrency: int, timeout: float, only: Collection[int] | None = None
    ) -> tuple[float, int, collections.Counter[str]]:
        """Every open socket (of `only`, if given) joins `topic`, at most `concurrency` joins in flight;
        (seconds, joins asked, failures by reason)."""
        sem = asyncio.Semaphore(concurrency)
        failures: collections.Counter[str] = collections.Counter()

        async def one(listener: _Base) -> None:
            async with sem:
                try:
                    async with asyncio.timeout(timeout):
                        await listener.join(topic)
                except TimeoutError:
                    failures["timeout"] += 1
                except Exception as exc:  # noqa: BLE001 - counted, by reason
                    failures[str(exc)[:100] or type(exc).__name__] += 1

        joining = [
            lst
            for i, lst in enumerate(self.listeners)
            if lst is not None and _is_open(lst) and topic not in lst.topics and (only is None or i in only)
        ]
        started = perf()
        await asyncio.gather(*(one(lst) for lst in joining))
        return perf() - started, len(joining), failures

    def members(self, topic: str) -> list[int]:
        """The open sockets that are in `topic`."""
        return [i for i, lst in enumerate(self.listeners) if lst is not None and topic in lst.topics and _is_open(lst)]

    def is_open(self, index: int) -> bool:
        listener = self.listeners[index]
        return listener is not None and _is_open(listener)

    def alive(self) -> int:
        return sum(
            1
            for lst in self.listeners
            if lst is not None and lst.transport is not None and not lst.transport.is_disconnected
        )

    async def close_all(self, timeout: float = 5.0) -> None:
        for lst in self.listeners:
            if lst is not None and lst.transport is not None and not lst.transport.is_disconnected:
                lst.transport.disconnect(graceful=False)
        await asyncio.sleep(0)


def _is_open(listener: _Base) -> bool:
    return listener.transport is not None and not listener.transport.is_disconnected


# A pooled connection idle this long is closed rather than used, as a client's pool should: the
# service closes one idle for 5 s (NOTIFY_KEEP_ALIVE_SECONDS), and a request sent as it does is lost.
IDLE_EXPIRY_SECONDS = 4.0


class _HttpConn(asyncio.Protocol):
    __slots__ = ("pool", "transport", "buf", "callback", "idle_since", "idled")

    def __init__(self, pool: Publisher) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.callback: Callable[[int, bytes], None] | None = None
        self.idle_since = perf()
        self.idled = 0.0  # how long it sat in the pool before its request in flight, if any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        at = head.find(b"content-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at)
            length = int(head[at + 15 : stop if stop > 0 else None])
        if len(buf) < end + 4 + length:
            return
        status = int(head[9:12])
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        callback, self.callback = self.callback, None
        self.pool._done(self, status, body, callback)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._lost(self)


class Publisher:
    """Open-loop POSTs over a pool of keep-alive HTTP/1.1 connections (no pipelining)."""

    def __init__(self, port: int, bearer: str, max_connections: int = 256) -> None:
        self.port = port
        self.prefix = (
            f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\n"
        ).encode()
        self.max = max_connections
        self.idle: list[_HttpConn] = []
        self.queue: collections.deque[tuple[bytes, Callable[[int, bytes], None]]] = collections.deque()
        self.count = 0
        self.opening = 0
        self.in_flight = 0
        self.errors = 0
        # For each request lost with its connection: how long that connection had sat idle before it.
        self.lost_after_idle: list[float] = []

    async def open(self, n: int) -> None:
        await asyncio.gather(*(self._open() for _ in range(n)))

    async def _open(self) -> None:
        self.opening += 1
        try:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(lambda: _HttpConn(self), "127.0.0.1", self.port)
        except OSError:
            self.errors += 1
            return
        finally:
            self.opening -= 1
        self.count += 1
        self._give(conn)

    def request(self, path: str, body: bytes, callback: Callable[[int, bytes], None], headers: bytes = b"") -> None:
        """POST `body` to `path`; `headers`: more header lines, each ending in CRLF."""
        raw = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\n",
                self.prefix,
                headers,
                b"Content-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        self.in_flight += 1
        while self.idle:
            conn = self.idle.pop()
            conn.idled = perf() - conn.idle_since
            if conn.idled < IDLE_EXPIRY_SECONDS:
                self._send(conn, raw, callback)
                return
            assert conn.transport is not None
            conn.transport.close()  # the server may be closing it just now
        self.queue.append((raw, callback))
        if self.count + self.opening < self.max and self.opening < 16:
            asyncio.get_running_loop().create_task(self._open())

    def _send(self, conn: _HttpConn, raw: bytes, callback: Callable[[int, bytes], None]) -> None:
        conn.callback = callback
        assert conn.transport is not None
        conn.transport.write(raw)

    def _give(self, conn: _HttpConn) -> None:
        if self.queue:
            raw, callback = self.queue.popleft()
            conn.idled = 0.0
            self._send(conn, raw, callback)
        else:
            conn.idle_since = perf()
            self.idle.append(conn)

    def _done(self, conn: _HttpConn, status: int, body: bytes, callback: Callable[[int, bytes], None] | None) -> None:
        self.in_flight -= 1
        if callback is not None:
            callback(status, body)
        self._give(conn)

    def _lost(self, conn: _HttpConn) -> None:
        self.count -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        if conn.callback is not None:
            self.in_flight -= 1
            self.errors += 1
            self.lost_after_idle.append(conn.idled)
            callback, conn.callback = conn.callback, None
            callback(0, b"")

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()

    async def drained(self, timeout: float) -> bool:
        deadline = perf() + timeout
        while self.in_flight and perf() < deadline:
            await asyncio.sleep(0.01)
        return not self.in_flight


async def paced(rate: float, count: int, fire: Callable[[int, float], None], limit: float) -> float:
    """Call fire(i, intended_time) for i in range(count) at `rate` per second (open loop); seconds taken."""
    t0 = perf()
    i = 0
    while i < count:
        now = perf()
        if now - t0 > limit:
            break
        due = min(count, int((now - t0) * rate) + 1)
        while i < due:
            fire(i, t0 + i / rate)
            i += 1
        # uvloop's timers count whole milliseconds and a shorter delay fires on the next loop turn,
        # so above 1,000/s sleeping until the next send would spin; sleep at least 1 ms and send
        # what fell due meanwhile (each request still carries its own intended time).
        wait = t0 + i / rate - perf()
        if wait > 0:
            await asyncio.sleep(max(wait, 0.001))
    return perf() - t0
