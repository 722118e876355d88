"""The listening socket (service/server/acceptor.py): a burst of connections is taken in one turn of the loop;
running out of descriptors pauses accepting instead of spinning."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE, STDOUT

import httpx
import psutil
import pytest

from service.server.acceptor import Acceptor

from .utils import ROOT, SECRET, TIMEOUT, Replica, free_port, started


class _Echo(asyncio.Protocol):
    made: list[_Echo] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())  # type: ignore[attr-defined]


async def test_every_pending_connection_is_taken_in_one_turn_and_served():
    _Echo.made = []
    acceptor = Acceptor.bind("127.0.0.1", 0, 1024, _Echo)
    port = acceptor.sockets[0].getsockname()[1]
    clients = []
    try:
        # 300 connections queued in the kernel before the loop gets a turn: a reconnect storm's arrivals.
        for _ in range(300):
            client = socket.create_connection(("127.0.0.1", port))
            clients.append(client)
        # No turn of the loop has run since they connected (the loop was held by the connects above): one
        # call, as one turn makes, takes all 300.
        assert acceptor.accept_pending(acceptor.sockets[0]) == 300
        for _ in range(50):
            if len(_Echo.made) == 300:
                break
            await asyncio.sleep(0.01)
        assert len(_Echo.made) == 300
        last = clients[-1]
        last.sendall(b"publish")
        last.settimeout(5)
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, last.recv, 16) == b"PUBLISH"
    finally:
        acceptor.close()
        for client in clients:
            client.close()
        for protocol in _Echo.made:
            protocol.transport.close()
    assert not acceptor.is_serving()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        raise AssertionError("still listening after close()")
    except ConnectionRefusedError:
        pass


async def test_every_address_is_listened_on_and_served():
    """A host that resolves to several addresses (`localhost`: 127.0.0.1 and ::1) is served on each
    of them, not only on the first."""
    _Echo.made = []
    port = free_port()
    addresses = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port, 0, 0))]
    acceptor = Acceptor.listen(addresses, 16, _Echo)
    try:
        assert [s.getsockname()[:2] for s in acceptor.sockets] == [("127.0.0.1", port), ("::1", port)]
        for host in ("127.0.0.1", "::1"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"hello " + host.encode())
            async with asyncio.timeout(TIMEOUT):
                assert await reader.readexactly(6 + len(host)) == b"HELLO " + host.upper().encode()
            writer.close()
    finally:
        acceptor.close()
        for protocol in _Echo.made:
            protocol.transport.close()


def test_out_of_descriptors_pauses_accepting_quietly_and_serves_again_once_they_free_up():
    """A replica whose RLIMIT_NOFILE is lowered to just above what it holds gets more connections
    than it can take: accept fails with EMFILE while they stay queued. It stops trying for a second
    at a time instead of at every turn of its loop: little CPU, one log line while it lasts, a
    count on /metrics. Once descriptors free up, queued and new connections are served again."""
    replica = Replica({"NOTIFY_HEADER_TIMEOUT_SECONDS": "120"})  # accepted idle sockets stay open
    with started(replica):
        assert replica.proc is not None
        proc = psutil.Process(replica.proc.pid)
        limit = _settled_fds(proc) + 4
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        clients = []
        try:
            for _ in range(12):  # 4 accepted, the rest queued in the kernel
                clients.append(socket.create_connection(("127.0.0.1", replica.port), timeout=TIMEOUT))
            log = Path(replica.log.name)
            _until(lambda: "accept" in log.read_text())  # the first failed accept is logged
            cpu_before, started_at = sum(proc.cpu_times()[:2]), time.monotonic()
            time.sleep(3.0)  # while it lasts: the loop must be idle, not spinning on the readable socket
            cpu = sum(proc.cpu_times()[:2]) - cpu_before
            window = time.monotonic() - started_at
            lines = [line for line in log.read_text().splitlines() if "accept" in line]
            print(f"\nFIGURES accept_starved: cpu_s={cpu:.3f}, window_s={window:.3f}, log_lines={len(lines)}")
            assert cpu < 0.25 * window, f"{cpu:.2f}s of CPU in {window:.2f}s while out of descriptors"
            assert len(lines) == 1, lines[:5]
        finally:
            for client in clients:
                client.close()
        # The replica closes what the clients closed; its descriptors free up, accepting resumes.
        _until(lambda: _answers(replica.url + "/healthz"))
        metrics = httpx.get(replica.url + "/metrics", timeout=TIMEOUT).text
        paused = next(line for line in metrics.splitlines() if line.startswith("notify_accept_paused_total "))
        assert float(paused.split()[1]) >= 1
        assert "accepting connections again" in log.read_text()


def _settled_fds(proc: psutil.Process) -> int:
    """The descriptors the process holds once none has opened or closed for a second (the
    start-up's readiness polls leave connections closing for a moment)."""
    deadline = time.monotonic() + 6 * TIMEOUT
    held, since = proc.num_fds(), time.monotonic()
    while time.monotonic() - since < 1.0:
        assert time.monotonic() < deadline, "the replica's descriptors never settled"
        time.sleep(0.05)
        if proc.num_fds() != held:
            held, since = proc.num_fds(), time.monotonic()
    return held


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


def _until(check: Callable[[], bool], within: float = 6 * TIMEOUT) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("option", "setting"),
    [("ssl", "ssl_certfile = 'cert.pem'"), ("uds", "uds = '/nonexistent/notify.sock'"), ("fd", "fd = 3")],
)
def test_uvicorn_listening_options_it_would_ignore_are_refused_at_start(option: str, setting: str):
    """The replica listens on host and port through its own acceptor: uvicorn's ssl, uds and fd
    options, if set, stop it at start with one clear line, instead of being ignored (uds, fd) or
    failing on the way (ssl)."""
    script = (
        "from service.config.settings import Settings\n"
        "from service.server.runner import build_server\n"
        f"server = build_server(Settings(), '127.0.0.1', {free_port()})\n"
        f"server.config.{setting}\n"
        "server.run()\n"
    )
    env = {**os.environ, "NOTIFY_JWT_SECRET": SECRET, "NOTIFY_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, stdout=PIPE, stderr=STDOUT)
    try:
        out, _ = proc.communicate(timeout=6 * TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 3, lines[-5:]
    assert len(lines) == 1, lines
    assert f"not supported: uvicorn's {option} option" in lines[0]
