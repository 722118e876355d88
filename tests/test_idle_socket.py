"""What an idle socket keeps (docs/capacity.md, "Memory per idle socket"), guarded by structure.

- The WebSocket protocol object keeps its attributes inline, sharing its class's keys, for every
  socket and not only the first few dozen: no dict of its own (1.5 KB a socket when it had one).
- Its liveness pings, and a connection's token expiry, are deadlines on one TimerWheel, not a loop
  timer each (TimerWheel's own behaviour is checked here too: in order, never early, cancellable).
- Reading an idle socket suspends no coroutine of the server's: `receive` answers a Future.
- The HTTP protocol that read a socket's handshake is freed when it hands the connection over,
  not left in a reference cycle for a full collection.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys

import uvicorn
from uvicorn.server import ServerState

from service.config.settings import Settings
from service.core.timers import Deadline, TimerWheel
from service.delivery.connection import Connection
from service.server.seams import send_eagerly
from service.server.wsprotocol import BoundedWebSocketProtocol
from service.telemetry.metrics import Metrics
from tests.utils import ROOT, SECRET, TIMEOUT, free_port, token

# Every name a socket's protocol is given over its life, outside its __init__: by uvicorn's
# protocol, by ours, and by the HTTP protocol that hands the connection over.
LIFETIME_NAMES = (
    "transport server client scheme request response scope handshake_initiated handshake_complete "
    "close_sent disconnected close_timer initial_response read_paused ping_timer pong_timer "
    "pending_ping_payload ping_sent_at last_ping_rtt frames curr_msg_data_type on_lost on_answered direct_write "
    "on_regate"
).split()


async def _app(scope: object, receive: object, send: object) -> None:
    return None


def _protocols(count: int) -> list[BoundedWebSocketProtocol]:
    config = uvicorn.Config(_app, log_config=None, ws_per_message_deflate=False)
    config.load()
    state, app_state, loop = ServerState(), {}, asyncio.get_running_loop()
    return [BoundedWebSocketProtocol(config, state, app_state, loop) for _ in range(count)]


def _own_dict(obj: object) -> dict[str, object] | None:
    """The instance's materialized __dict__, if CPython made one (without making one by asking)."""
    for referent in gc.get_referents(obj):
        if type(referent) is dict and "transport" in referent:
            return referent
    return None


async def test_every_socket_keeps_its_attributes_inline_through_its_life():
    # The class stops learning names after a few dozen instances: a name first given to a socket
    # after that (by a ping, a close) would give that socket a dict of its own.
    early = _protocols(64)
    late = _protocols(1)[0]
    for name in LIFETIME_NAMES:
        setattr(late, name, getattr(late, name, None))
    late.ping_timer = object()
    assert _own_dict(late) is None, "a socket's protocol got a dict of its own"
    assert all(_own_dict(p) is None for p in early)


async def test_connection_has_no_dict_and_no_task_or_queue_while_idle():
    async def close(code: int, reason: str) -> None:
        return None

    wheel = TimerWheel(asyncio.get_running_loop())
    conn = Connection("u", 2e9, Settings(jwt_secret="x" * 32), Metrics("r"), close, wheel)  # type: ignore[arg-type]
    assert not hasattr(conn, "__dict__")
    conn.attach(_write_at_once, start=send_eagerly)  # the server offers it through the scope
    conn.send('{"type":"pong"}')  # written at once: nothing is left queued, no task is made
    assert conn._queue is None and conn._flush_task is None


async def _write_at_once(frame: str) -> None:
    return None


async def test_reading_an_idle_socket_is_a_future_not_a_coroutine():
    protocol = _protocols(1)[0]
    pending = protocol.receive()
    assert isinstance(pending, asyncio.Future) and not pending.done()
    protocol.queue.put_nowait({"type": "websocket.receive", "text": "{}"})
    assert await asyncio.wait_for(pending, 5) == {"type": "websocket.receive", "text": "{}"}


async def test_pings_are_deadlines_on_the_servers_wheel():
    first, second = _protocols(2)
    first.transport = second.transport = _Transport()  # type: ignore[assignment]
    first.schedule_ping()
    second.schedule_ping()
    assert isinstance(first.ping_timer, Deadline) and isinstance(second.ping_timer, Deadline)
    assert first._shared.timers is second._shared.timers
    first.stop_keepalive()
    second.stop_keepalive()


class _Transport:
    def is_closing(self) -> bool:
        return False


async def test_wheel_runs_deadlines_in_order_never_early_and_not_once_cancelled():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.05)
    ran: list[tuple[str, float]] = []
    started = loop.time()
    done = loop.create_future()

    def record(name: str) -> None:
        ran.append((name, loop.time()))
        if name == "last":
            done.set_result(None)

    wheel.call_later(0.2, "b", record)
    wheel.call_later(0.05, "a", record)
    cancelled = wheel.call_later(0.1, "never", record)
    wheel.call_later(0.3, "last", record)
    cancelled.cancel()
    await asyncio.wait_for(done, 10)
    assert [name for name, _ in ran] == ["a", "b", "last"]
    for (name, at), delay in zip(ran, (0.05, 0.2, 0.3), strict=True):
        assert at >= started + delay - 0.002, f"{name} ran early"


async def test_wheel_deadline_added_while_firing_still_runs():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.05)
    done = loop.create_future()

    def chain(step: int) -> None:
        if step == 3:
            done.set_result(step)
        else:
            wheel.call_later(0.0 if step == 1 else 0.05, step + 1, chain)

    wheel.call_later(0.05, 0, chain)
    assert await asyncio.wait_for(done, 10) == 3


async def test_wheel_slot_shared_by_deadlines_runs_those_not_cancelled():
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.1)
    ran: list[int] = []
    done = loop.create_future()
    deadlines = [wheel.call_later(0.05, i, ran.append) for i in range(5)]  # one slot, five deadlines
    deadlines[1].cancel()
    deadlines[3].cancel()
    wheel.call_later(0.2, None, lambda _: done.set_result(None))
    await asyncio.wait_for(done, 10)
    assert sorted(ran) == [0, 2, 4]


async def test_wheel_deadline_reused_runs_again_on_the_grid_and_once():
    # A socket's keepalive sets its one deadline again each time it runs (`call_at` with `reuse`):
    # it runs at its new slot's time, once, and a reuse of a deadline still pending moves it.
    loop = asyncio.get_running_loop()
    wheel = TimerWheel(loop, resolution=0.05)
    ran: list[float] = []
    done = loop.create_future()
    holder: list[Deadline] = []

    def again(_: object) -> None:
        deadline = holder[0]
        ran.append(wheel.time_of(deadline))
        if len(ran) == 3:
            done.set_result(None)
            return
        assert wheel.call_at(wheel.time_of(deadline) + 0.1, None, again, reuse=deadline) is deadline

    first = wheel.call_later(0.05, None, again)
    holder.append(first)
    moved = wheel.call_at(loop.time() + 0.05, None, again, reuse=first)  # pending: moved, not doubled
    assert moved is first
    await asyncio.wait_for(done, 10)
    await asyncio.sleep(0.15)
    assert len(ran) == 3
    assert [round(b - a, 6) for a, b in zip(ran, ran[1:], strict=False)] == [0.1, 0.1]
    assert all(round(at / 0.05, 6).is_integer() for at in ran)


async def test_wheel_interval_after_a_grid_time_is_that_interval_at_any_slot():
    # Keepalive sets its next ping an interval after the last one's grid time; in floating point
    # `0.05 * k + 0.1` is often a hair past slot k + 2, and must not wait for slot k + 3.
    wheel = TimerWheel(asyncio.get_running_loop(), resolution=0.05)
    late = []
    for k in range(1, 20_000):
        deadline = wheel.call_at(k * 0.05 + 0.1, None, print)
        if round(wheel.time_of(deadline) - k * 0.05, 6) != 0.1:
            late.append(k)
        deadline.cancel()
    assert late == []


# The replica's side of the test below: collections off, so that what a socket's handshake leaves
# in a reference cycle stays where `gc.get_objects` finds it.
_HANDED_OVER = """
import gc, json, sys, threading
from websockets.sync.client import connect
from service.config.settings import Settings
from service.server.httpprotocol import PublishingHttpProtocol
from service.server.runner import build_server

gc.disable()
port, tokens = int(sys.argv[1]), sys.argv[2:]
server = build_server(Settings(), "127.0.0.1", port)

def clients():
    import time
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    sockets = [connect(f"ws://127.0.0.1:{port}/ws?token={t}") for t in tokens]
    welcomed = sum(json.loads(s.recv(5))["type"] == "welcome" for s in sockets)
    left = sum(type(o) is PublishingHttpProtocol for o in gc.get_objects())
    print(json.dumps({"welcomed": welcomed, "http_protocols_left": left}), flush=True)
    for s in sockets:
        s.close()
    server.should_exit = True

threading.Thread(target=clients, daemon=True).start()
server.run()
"""


def test_a_socket_handed_over_from_http_leaves_nothing_for_the_collector():
    # The HTTP protocol that reads a handshake and its parser refer to each other: left as they
    # were, every socket's handshake was freed only by a full collection, which a burst of
    # connects holds back, and 2,000 sockets connected 100 at a time kept 3.5 KB more each.
    tokens = [token(f"u{i}") for i in range(8)]
    env = {**os.environ, "NOTIFY_JWT_SECRET": SECRET, "NOTIFY_LOG_LEVEL": "warning"}
    env.pop("NOTIFY_REDIS_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", _HANDED_OVER, str(free_port()), *tokens],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=12 * TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"welcomed": 8, "http_protocols_left": 0}
