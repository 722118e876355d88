"""Debian's firefox-esr, headless, on a fresh profile, driven over WebDriver BiDi (the W3C protocol
Firefox serves on --remote-debugging-port) with the websockets package the service already uses:
open a page, evaluate a script in it and wait for its promise."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from .utils import TIMEOUT

_LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


def firefox_binary() -> str | None:
    return shutil.which("firefox-esr") or shutil.which("firefox")


def user_js(prefs: dict[str, Any]) -> str:
    return "".join(f"user_pref({json.dumps(name)}, {json.dumps(value)});\n" for name, value in prefs.items())


class Firefox:
    """One headless Firefox; `evaluate` runs an async expression in the open page and returns its
    JSON-able result (or raises with the page's error)."""

    def __init__(self, profile: Path, prefs: dict[str, Any]) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "user.js").write_text(user_js(prefs))
        self._profile = profile
        self._ids = itertools.count(1)
        self._process: subprocess.Popen[str] | None = None
        self._socket: ClientConnection | None = None
        self._context = ""
        self.log: list[str] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[Firefox]:
        binary = firefox_binary()
        assert binary is not None, "firefox-esr is not installed (make system-deps)"
        env = {**os.environ, "MOZ_HEADLESS": "1", "MOZ_CRASHREPORTER_DISABLE": "1"}
        args = [binary, "--headless", "--no-remote", "--profile", str(self._profile), "--remote-debugging-port", "0"]
        self._process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        try:
            with connect(self._bidi_url() + "/session", max_size=None, open_timeout=TIMEOUT) as socket:
                self._socket = socket
                self._command("session.new", {"capabilities": {}})
                tree = self._command("browsingContext.getTree", {})
                self._context = tree["contexts"][0]["context"]
                yield self
        finally:
            # Firefox's content processes are in its session: end them all with it, by its id.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(4 * TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(TIMEOUT)

    def _bidi_url(self) -> str:
        """The address Firefox prints once its remote agent listens (read on a thread: stderr is
        also where Firefox keeps talking, and must keep being drained)."""
        assert self._process is not None and self._process.stderr is not None
        found = threading.Event()
        url: list[str] = []

        def drain(stream: Any) -> None:
            for line in stream:
                self.log.append(line.rstrip())
                match = _LISTENING.search(line)
                if match and not url:
                    url.append(match.group(1))
                    found.set()

        threading.Thread(target=drain, args=(self._process.stderr,), daemon=True).start()
        assert found.wait(12 * TIMEOUT), "Firefox did not start its WebDriver BiDi agent:\n" + "\n".join(self.log[-20:])
        return url[0]

    def _command(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        assert self._socket is not None
        command_id = next(self._ids)
        self._socket.send(json.dumps({"id": command_id, "method": method, "params": params}))
        deadline = time.monotonic() + 12 * TIMEOUT
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") != command_id:
                continue  # an event: none is subscribed to, but skip any
            if message.get("type") == "error":
                raise RuntimeError(f"{method}: {message.get('error')}: {message.get('message')}")
            return dict(message["result"])
        raise TimeoutError(f"{method} got no answer")

    def goto(self, url: str) -> None:
        self._command("browsingContext.navigate", {"context": self._context, "url": url, "wait": "complete"})

    def evaluate(self, expression: str) -> Any:
        """The value of `expression` (awaited) in the page, through JSON."""
        result = self._command(
            "script.evaluate",
            {
                "expression": f"(async () => JSON.stringify(await ({expression})))()",
                "target": {"context": self._context},
                "awaitPromise": True,
            },
        )
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise RuntimeError(f"the page threw: {details.get('text')}")
        value = result["result"].get("value")
        return None if value is None else json.loads(value)
