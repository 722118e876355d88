"""A local push service for Firefox: Mozilla's push protocol to the browser (a WebSocket, subprotocol
`push-notification`, JSON messages `hello` / `register` / `unregister` / `notification` / `ack` /
`ping`, as autopush speaks it) and RFC 8030 to senders (POST /wpush/<channel>, the VAPID JWT checked
against the key the page subscribed with, the encrypted body forwarded as it is).

Firefox finds it through the `dom.push.serverURL` pref (`ws://` needs `dom.push.testing.allowInsecureServerURL`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .pushkit import _Server, unb64
from .utils import TIMEOUT


@dataclass
class Channel:
    """One subscription: Firefox's channel id and the applicationServerKey it was made with."""

    id: str
    key: str | None
    delivered: list[str] = field(default_factory=list)  # versions Firefox acknowledged


class VapidRefused(Exception):
    """What a real push service answers 401/403 for."""


class MozPush:
    """The push service. `ws_url` goes in Firefox's prefs; `origin` is where the endpoints are."""

    def __init__(self) -> None:
        self.channels: dict[str, Channel] = {}
        self.refused: list[str] = []  # why each refused push was refused
        self._socket: ServerConnection | None = None
        self._uaid = uuid.uuid4().hex
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop = asyncio.Event()
        self._ws_port = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._http = _Server(self._push)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self._ws_port}/"

    @property
    def origin(self) -> str:
        return self._http.origin

    @contextlib.contextmanager
    def running(self) -> Iterator[MozPush]:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the push service's WebSocket did not start"
        with self._http.running():
            try:
                yield self
            finally:
                self._loop.call_soon_threadsafe(self._stop.set)
                self._thread.join(TIMEOUT)

    def wait_for_ack(self, channel_id: str, count: int) -> list[str]:
        """Bounded wait until Firefox acknowledged `count` notifications on the channel."""
        deadline = time.monotonic() + 6 * TIMEOUT
        while time.monotonic() < deadline:
            channel = self.channels.get(channel_id)
            if channel is not None and len(channel.delivered) >= count:
                return list(channel.delivered)
            time.sleep(0.05)
        return list(self.channels[channel_id].delivered) if channel_id in self.channels else []

    # ---- the browser's side

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        async with serve(self._browser, "127.0.0.1", 0, subprotocols=["push-notification"]) as server:  # type: ignore[list-item]
            self._ws_port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _browser(self, socket: ServerConnection) -> None:
        self._socket = socket
        with contextlib.suppress(ConnectionClosed):  # the browser quitting
            await self._converse(socket)

    async def _converse(self, socket: ServerConnection) -> None:
        async for raw in socket:
            message = json.loads(raw)
            kind = message.get("messageType")
            if kind == "hello":
                # One browser, one user agent id: a reconnecting Firefox keeps its channels.
                reply: dict[str, Any] = {"messageType": "hello", "uaid": self._uaid, "status": 200, "use_webpush": True}
            elif kind == "register":
                channel = Channel(message["channelID"], message.get("key"))
                self.channels[channel.id] = channel
                reply = {
                    "messageType": "register",
                    "channelID": channel.id,
                    "status": 200,
                    "uaid": self._uaid,
                    "pushEndpoint": f"{self.origin}/wpush/{channel.id}",
                }
            elif kind == "unregister":
                self.channels.pop(message["channelID"], None)
                reply = {"messageType": "unregister", "channelID": message["channelID"], "status": 200}
            elif kind == "ack":
                for update in message.get("updates", []):
                    if update["channelID"] in self.channels:
                        self.channels[update["channelID"]].delivered.append(update["version"])
                continue
            elif kind in ("nack", "broadcast_subscribe"):
                continue
            else:
                reply = {}  # a ping (`{}`) is answered with `{}`
            await socket.send(json.dumps(reply))

    # ---- the senders' side (RFC 8030)

    def _push(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        channel = self.channels.get(path.removeprefix("/wpush/"))
        if not path.startswith("/wpush/") or channel is None:
            return 404, {}, b"no such subscription"
        try:
            self._check_vapid(channel, headers.get("authorization", ""))
        except (VapidRefused, jwt.PyJWTError, ValueError, KeyError) as exc:
            self.refused.append(str(exc))
            return 401, {}, str(exc).encode()
        if headers.get("content-encoding") != "aes128gcm" or "ttl" not in headers:
            return 400, {}, b"aes128gcm and a TTL are required"
        version = uuid.uuid4().hex
        notification = {
            "messageType": "notification",
            "channelID": channel.id,
            "version": version,
            "data": base64.urlsafe_b64encode(body).rstrip(b"=").decode(),
            "headers": {"encoding": "aes128gcm"},
        }
        socket = self._socket
        if socket is None:
            return 503, {}, b"the browser is not connected"
        asyncio.run_coroutine_threadsafe(socket.send(json.dumps(notification)), self._loop).result(TIMEOUT)
        return 201, {"Location": f"{self.origin}/m/{version}"}, b""

    def _check_vapid(self, channel: Channel, authorization: str) -> None:
        """RFC 8292: `vapid t=<JWT>,k=<key>`; the key is the one the subscription was made with, the
        JWT is ES256 under it, for this origin, expiring within 24 hours."""
        scheme, _, params = authorization.partition(" ")
        if scheme.lower() != "vapid":
            raise VapidRefused("no vapid authorization")
        parts = dict(part.strip().split("=", 1) for part in params.split(","))
        if channel.key is None or unb64(parts["k"]) != unb64(channel.key):
            raise VapidRefused("k is not the subscription's applicationServerKey")
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64(parts["k"]))
        claims = jwt.decode(parts["t"], key, algorithms=["ES256"], audience=self.origin, options={"require": ["exp"]})
        if claims["exp"] > time.time() + 24 * 3600:
            raise VapidRefused("exp is more than 24 hours away")
