"""Raw HTTP on real sockets, for tests that must see exactly what the server sends and when it
closes: no client library retries, reconnects or hides a missing answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import orjson

from .utils import TIMEOUT, Replica

# On top of a deadline the server sets, for a loaded machine.
SLACK = TIMEOUT


def report(name: str, **figures: Any) -> None:
    shown = (f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\nFIGURES {name}: " + ", ".join(shown))


class Answer:
    """What came back on a raw connection: the response (if any) and how long the server took to close."""

    def __init__(self, raw: bytes, closed_after: float | None) -> None:
        self.raw = raw
        self.closed_after = closed_after  # None: still open when the client gave up
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if raw.startswith(b"HTTP/1.1 ") else None
        self.headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}

    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.body)
        return result


async def exchange(
    port: int, data: bytes, *, trickle: list[bytes] | None = None, every: float = 0.3, local: str | None = None
) -> Answer:
    """Send `data` (then each of `trickle`, `every` seconds apart), and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(local, 0) if local else None)
    started = time.monotonic()
    writer.write(data)
    raw = b""
    pending = list(trickle or [])
    try:
        async with asyncio.timeout(3 * TIMEOUT):
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), every if pending else None)
                except TimeoutError:
                    with contextlib.suppress(ConnectionError):
                        writer.write(pending.pop(0))
                    continue
                if not chunk:
                    return Answer(raw, time.monotonic() - started)
                raw += chunk
    except ConnectionResetError:
        return Answer(raw, time.monotonic() - started)
    except TimeoutError:
        return Answer(raw, None)
    finally:
        writer.close()


async def metric(http: httpx.AsyncClient, r: Replica, line_start: str) -> float:
    for line in (await http.get(r.url + "/metrics")).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[1])
    return 0.0


def head(method: str, target: str, *headers: str) -> bytes:
    return (f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers)).encode()
