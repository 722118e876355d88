"""The Python client's own distribution (service/client/pyproject.toml): built into a wheel, installed
into a fresh virtualenv that has httpx and websockets and nothing of the server's (no FastAPI,
uvicorn, Redis, pydantic), and used there against a real replica."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from .utils import ROOT, TIMEOUT, publisher_headers, token

SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "redis", "pydantic", "pydantic_settings", "jwt", "prometheus_client")

# Publishes as a backend and listens as the user, in the fresh virtualenv; prints what it saw.
SCRIPT = """
import asyncio, importlib.util, json, sys
import service.client as client

async def main(base, ws_url, publish_token, user_token, user):
    async with client.Publisher(base, publish_token) as pub:
        listener = client.listen(ws_url, user_token)
        received = []

        async def read():
            async for notification in listener:
                received.append(notification)
                if len(received) == 2:
                    return

        reading = asyncio.ensure_future(read())
        for _ in range(200):
            if listener.state == "open":
                break
            await asyncio.sleep(0.05)
        first = await pub.notify(user, "shipped", {"n": 1})
        everyone = await pub.broadcast("maintenance")
        await asyncio.wait_for(reading, 20)
        await listener.close()
    server_only = sorted(name for name in SERVER_ONLY if importlib.util.find_spec(name) is not None)
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(SERVER_ONLY))
    print(json.dumps({
        "client_file": client.__file__,
        "sent": [first.id, everyone.id],
        "got": [[n.id, n.stream, n.event] for n in received],
        "installed": server_only,
        "imported": loaded,
    }))

SERVER_ONLY = %s
asyncio.run(main(*sys.argv[1:]))
"""


def _top_level(distribution: str) -> set[str]:
    """The importable names and metadata directory of an installed distribution."""
    files = importlib.metadata.distribution(distribution).files or []
    return {file.parts[0] for file in files if file.parts[0] != ".." and not file.parts[0].endswith(".pth")}


def _closure(*names: str) -> set[str]:
    """The distributions these need on this interpreter, themselves included (no extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name.lower() in seen:
            continue
        seen.add(name.lower())
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_the_client_installs_and_works_without_the_server(tmp_path: Path, single):
    # Build from a copy, so that the build leaves nothing in the source tree.
    source = tmp_path / "client-src"
    shutil.copytree(ROOT / "service" / "client", source, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(source)]
    subprocess.run(build, check=True, timeout=30 * TIMEOUT)
    [wheel] = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        f"service/client/{p.name}" for p in (ROOT / "service" / "client").glob("*.py")
    }, "only the client, and no service/__init__.py that would shadow the server's"
    assert re.findall(r"^Requires-Dist: ([A-Za-z0-9_-]+)", metadata, re.M) == ["httpx", "websockets"]

    # A fresh virtualenv whose only packages besides the client are httpx, websockets and what
    # they need, taken from this one.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=10 * TIMEOUT)
    python = venv / "bin" / "python"
    install = [*pip, "--python", str(python), "install", "-q", "--no-index", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, timeout=30 * TIMEOUT)
    deps = tmp_path / "deps"
    deps.mkdir()
    here = Path(importlib.metadata.distribution("httpx").locate_file(""))
    for distribution in _closure("httpx", "websockets"):
        for name in _top_level(distribution):
            (deps / name).symlink_to(here / name)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(subprocess.check_output([python, "-c", purelib], text=True).strip())
    (site / "deps.pth").write_text(str(deps) + "\n")

    user = "dist-user"
    script = SCRIPT % (SERVER_ONLY,)
    args = [single.url, single.ws_url, publisher_headers()["Authorization"][7:], token(user), user]
    done = subprocess.run(
        [python, "-I", "-c", script, *args], capture_output=True, text=True, timeout=30 * TIMEOUT, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["client_file"].startswith(str(site)), "the installed client, not the source tree's"
    assert seen["installed"] == [] and seen["imported"] == [], "nothing of the server is there"
    assert seen["got"] == [
        [seen["sent"][0], "user", "shipped"],
        [seen["sent"][1], "broadcast", "maintenance"],
    ]
