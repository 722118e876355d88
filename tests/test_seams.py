"""The seams (docs/seams.md): every private or undocumented library name the service uses is in the
table, still there in the installed library with the same shape, used where the table says, and
nowhere above the server and the Redis broker."""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
import re
from typing import Any

import pytest

from service.server.seams import send_eagerly

from .utils import ROOT, running

LIBRARIES = ("uvicorn", "starlette", "fastapi", "websockets", "httptools", "redis", "asyncio")
ALLOWED = ("service/server/", "service/broker/redis/")
# Documented parts of the standard library that happen to start with an underscore.
STDLIB_PUBLIC = {"_replace", "_asdict", "_fields", "_make"}

# What each callable must still take (parameter names, in order, the first ones at least).
SIGNATURES = {
    "uvicorn.middleware.proxy_headers._TrustedHosts": ["trusted_hosts"],
    "uvicorn.server.Server._log_started_message": ["self", "listeners"],
    "uvicorn.server.Server.startup": ["self", "sockets"],
    "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol._start_asgi_task": ["self", "cycle", "app"],
    "uvicorn.protocols.websockets.websockets_sansio_impl.WebSocketsSansIOProtocol.send": ["self", "message"],
    "redis.asyncio.connection.AbstractConnection._connect": ["self"],
    "redis.asyncio.sentinel.SentinelConnectionPool.get_master_address": ["self"],
    "redis.asyncio.cluster.NodesManager.get_node_from_slot": ["self", "slot"],
    "redis.asyncio.cluster.NodesManager.initialize": ["self"],
}


def table() -> list[dict[str, str]]:
    """docs/seams.md's rows: library, name, how, module, test."""
    rows = []
    for line in (ROOT / "docs" / "seams.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[1].startswith("`"):
            library, name, how, module, test = cells
            rows.append({"library": library, "name": name.strip("`"), "how": how, "module": module.strip("`")})
            rows[-1]["test"] = test.strip("`")
    return rows


def resolve(dotted: str) -> tuple[Any, str | None]:
    """The object a dotted name stands for; for an attribute set only on instances, (its class, the name)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        rest = parts[cut:]
        for index, part in enumerate(rest):
            if not hasattr(found, part):
                if index == len(rest) - 1 and inspect.isclass(found):
                    return found, part
                raise AssertionError(f"{dotted}: {part} is gone")
            found = getattr(found, part)
        return found, None
    raise AssertionError(f"{dotted}: no such module")


def test_every_name_in_the_table_is_still_there_with_its_shape():
    rows = table()
    assert len(rows) >= 10
    for row in rows:
        found, instance_attribute = resolve(row["name"])
        if instance_attribute is not None:
            # Set in the class's own code (an instance attribute): the assignment must still be there.
            source = "".join(inspect.getsource(base) for base in found.__mro__ if base.__module__ != "builtins")
            assert f"self.{instance_attribute} = " in source, row["name"]
        wanted = SIGNATURES.get(row["name"])
        if wanted is not None:
            target = found.__init__ if inspect.isclass(found) else found
            names = [p for p in inspect.signature(target).parameters if not (inspect.isclass(found) and p == "self")]
            assert names[: len(wanted)] == wanted, (row["name"], names)
    assert set(SIGNATURES) <= {row["name"] for row in rows}


def test_the_hand_driven_send_still_waits_only_for_room():
    """`send_eagerly` relies on uvicorn's WebSocket send suspending only on its flow control."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    awaits = re.findall(r"await ([^\n]+)", inspect.getsource(WebSocketsSansIOProtocol.send))
    assert awaits == ["self.writable.wait()"], awaits


def test_uvicorns_response_complete_still_takes_only_the_steps_the_header_clock_replaces():
    """`GuardedHttpProtocol.on_response_complete` is uvicorn's, less its keep-alive timer (kept by
    the header clock): a step uvicorn adds there is a step the replacement would miss."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    steps = set(re.findall(r"self\.([\w.]+)", inspect.getsource(HttpToolsProtocol.on_response_complete)))
    assert steps == {
        "server_state.total_requests",
        "transport.is_closing",
        "_unset_keepalive_if_required",  # cancels the timer below: never armed here
        "flow.resume_reading",
        "pipeline",
        "pipeline.pop",
        "_start_asgi_task",
        "timeout_keep_alive_task",
        "loop.call_later",
        "timeout_keep_alive",
        "timeout_keep_alive_handler",  # closes the transport, as the header clock does
    }, steps


def _library_base(cls: type) -> type | None:
    return next((b for b in cls.__mro__ if b.__module__.split(".")[0] in LIBRARIES), None)


def _private_of_libraries(cls: type) -> set[str]:
    """Private names the library classes among `cls`'s bases define or set on their instances."""
    names: set[str] = set()
    for base in cls.__mro__:
        if base.__module__.split(".")[0] not in LIBRARIES:
            continue
        names |= {name for name in vars(base) if name.startswith("_") and not name.startswith("__")}
        names |= set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(base)))
    return names


def private_uses() -> set[tuple[str, str]]:
    """(private name, module) for each library private the code uses: imported, read on another
    object, called through super(), overridden, or read on self in a subclass of a library class."""
    found: set[tuple[str, str]] = set()
    for path in sorted((ROOT / "service").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        if module.startswith("service/client/"):
            continue  # its own distribution; uses no server library
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in LIBRARIES:
                found |= {(alias.name, module) for alias in node.names if alias.name.startswith("_")}
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    if node.attr not in STDLIB_PUBLIC:
                        found.add((node.attr, module))
        loaded = importlib.import_module(module[:-3].replace("/", ".").removesuffix(".__init__"))
        for cls_node in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            cls = getattr(loaded, cls_node.name, None)
            if not inspect.isclass(cls) or _library_base(cls) is None:
                continue
            theirs = _private_of_libraries(cls)
            for node in ast.walk(cls_node):
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                    if node.attr in theirs:
                        found.add((node.attr, module))
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in theirs:
                    found.add((node.name, module))
    return found


def test_the_table_and_the_code_agree():
    in_code = private_uses()
    in_table = {(row["name"].rsplit(".", 1)[1], row["module"]) for row in table()}
    private_in_table = {(name, module) for name, module in in_table if name.startswith("_")}
    assert in_code - private_in_table == set(), "private library names used but not in docs/seams.md"
    assert private_in_table - in_code == set(), "names in docs/seams.md no longer used where it says"
    for name, module in in_table:  # the undocumented ones, by name in their module
        assert re.search(rf"\b{name}\b", (ROOT / module).read_text()), (name, module)
    outside = {(name, module) for name, module in in_code if not module.startswith(ALLOWED)}
    assert outside == set(), "library internals above the server and the Redis broker"


def test_every_row_names_a_test_that_exists():
    for row in table():
        path, _, name = row["test"].partition("::")
        assert re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M), row["test"]


def test_every_state_websockets_sets_reaches_the_socket_gate():
    """The fan-out writes to a socket without asking it first (`direct_write`) only while it is open:
    websockets' every change of state, through its own `state` setter, must reach the protocol that
    keeps that gate, from the handshake to a close the peer starts."""
    from websockets.protocol import State

    from service.server.wsprotocol import _GatedServerProtocol

    seen: list[State] = []

    class Owner:
        def regate(self) -> None:
            seen.append(conn.state)

    conn = _GatedServerProtocol()
    conn.owner = Owner()  # type: ignore[assignment]
    assert conn.state is State.CONNECTING and seen == []
    conn.receive_data(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    conn.send_response(conn.accept(conn.events_received()[0]))
    assert seen == [State.OPEN]
    # The peer's close (masked, code 1000): websockets answers it and is closing, then closed at EOF.
    conn.receive_data(bytes([0x88, 0x82, 1, 2, 3, 4, 0x03 ^ 1, 0xE8 ^ 2]))
    assert seen[1:] == [State.CLOSING] and conn.state is State.CLOSING
    conn.receive_eof()
    assert seen[-1] is State.CLOSED and conn.state is State.CLOSED


def test_pyproject_names_the_same_seams():
    """pyproject.toml's comments mirror the table: each private name is mentioned there too."""
    text = (ROOT / "pyproject.toml").read_text()
    for row in table():
        assert row["name"].rsplit(".", 1)[1] in text, row["name"]


async def test_send_eagerly_finishes_at_once_or_hands_back_the_rest():
    """A send that does not wait is done at once; one that waits comes back as a task that finishes it."""
    done: list[str] = []

    async def quick() -> None:
        done.append("quick")

    assert send_eagerly(quick()) is None and done == ["quick"]
    room = asyncio.Event()

    async def waits() -> None:
        await room.wait()
        done.append("waited")

    rest = send_eagerly(waits())
    assert rest is not None and done == ["quick"]
    finishing = asyncio.ensure_future(rest)
    await asyncio.sleep(0)
    room.set()
    await asyncio.wait_for(finishing, 5)
    assert done == ["quick", "waited"]

    async def fails() -> None:
        raise ConnectionError("gone")

    with pytest.raises(ConnectionError):
        send_eagerly(fails())


def test_the_server_starts_on_its_own_socket_and_says_where():
    """`Server.startup([])` then `_log_started_message`: uvicorn starts the app, listens nowhere itself,
    and the address printed is the acceptor's."""
    with running({"NOTIFY_LOG_LEVEL": "info"}) as replica:
        assert f"running on http://127.0.0.1:{replica.port}" in replica.output()
