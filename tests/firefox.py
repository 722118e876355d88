"""Debian's firefox-esr, headless, on a fresh profile, driven over WebDriver BiDi (the W3C protocol
Firefox serves on --remote-debugging-port) with the websockets package the service already uses:
open a page, evaluate a script in it and wait for its promise. With `system_access`, also click a
web notification the way a user would (`click_notification`)."""

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

    def __init__(self, profile: Path, prefs: dict[str, Any], system_access: bool = False) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "user.js").write_text(user_js(prefs))
        self._profile = profile
        self._ids = itertools.count(1)
        self._process: subprocess.Popen[str] | None = None
        self._socket: ClientConnection | None = None
        self._context = ""
        self._system_access = system_access
        self.log: list[str] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[Firefox]:
        binary = firefox_binary()
        assert binary is not None, "firefox-esr is not installed (make system-deps)"
        env = {**os.environ, "MOZ_HEADLESS": "1", "MOZ_CRASHREPORTER_DISABLE": "1"}
        args = [binary, "--headless", "--no-remote", "--profile", str(self._profile), "--remote-debugging-port", "0"]
        if self._system_access:
            # Lets BiDi see and script Firefox's own (chrome) windows, a notification's among them:
            # nothing else can click one headless. Without it chrome contexts are refused.
            args.append("--remote-allow-system-access")
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

    @property
    def page(self) -> str:
        """The browsing context `goto` and `evaluate` use by default: the tab Firefox started with."""
        return self._context

    def goto(self, url: str) -> None:
        self._command("browsingContext.navigate", {"context": self._context, "url": url, "wait": "complete"})

    def evaluate(self, expression: str, context: str | None = None) -> Any:
        """The value of `expression` (awaited) in the page (or in `context`), through JSON."""
        result = self._command(
            "script.evaluate",
            {
                "expression": f"(async () => JSON.stringify(await ({expression})))()",
                "target": {"context": context or self._context},
                "awaitPromise": True,
            },
        )
        if result["type"] == "exception":
            details = result["exceptionDetails"]
            raise RuntimeError(f"the page threw: {details.get('text')}")
        value = result["result"].get("value")
        return None if value is None else json.loads(value)

    def tabs(self) -> dict[str, str]:
        """Every top-level browsing context (tab or window) the pages have, context id to url."""
        return {c["context"]: c["url"] for c in self._command("browsingContext.getTree", {"maxDepth": 0})["contexts"]}

    def activate(self, context: str) -> None:
        self._command("browsingContext.activate", {"context": context})

    def close(self, context: str) -> None:
        self._command("browsingContext.close", {"context": context})

    def click_notification(self, title: str) -> None:
        """Clicks the notification titled `title` as a user would, once it is shown (bounded wait).

        With `alerts.useSystemBackend` false Firefox shows a web notification in a small chrome
        window of its own (chrome://global/content/alerts/alert.xhtml), which headless Firefox
        creates too; a click on it is what tells Firefox's notification code, and through it the
        service worker's `notificationclick`, that the user clicked. BiDi can evaluate in that window
        (system access) but `input.performActions` refuses chrome contexts, so the click is the
        window's own `synthesizeMouseEvent` (what Firefox's EventUtils uses): a mousedown and a
        mouseup at the middle of the notification's text, hit-tested and turned into a `click` by
        Firefox's event handling as a real one is. The window is only clickable once alert.js has
        set it up (`gIsActive`)."""
        assert self._system_access, "clicking a notification needs Firefox(..., system_access=True)"
        ready = f"""window.gIsActive === true
          && document.getElementById("alertTitleLabel").value === {json.dumps(title)}"""
        click = """(() => {
          const box = document.getElementById("alertTextBox").getBoundingClientRect();
          const [x, y] = [box.x + box.width / 2, box.y + box.height / 2];
          for (const type of ["mousedown", "mouseup"]) {
            window.synthesizeMouseEvent(type, x, y, {button: 0, clickCount: 1});
          }
          return true;
        })()"""
        deadline = time.monotonic() + 6 * TIMEOUT
        while time.monotonic() < deadline:
            windows = self._command("browsingContext.getTree", {"moz:scope": "chrome", "maxDepth": 0})["contexts"]
            for window in windows:
                if window["url"] != "chrome://global/content/alerts/alert.xhtml":
                    continue
                try:
                    shown = self.evaluate(ready, window["context"])
                except RuntimeError:
                    continue  # another notification's window, closing as it was looked at
                if shown:
                    self.evaluate(click, window["context"])
                    return
            time.sleep(0.1)
        raise TimeoutError(f"no notification titled {title!r} was shown")
