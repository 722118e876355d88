"""Devices for push (docs/protocol.md, "Push"): an app registers where the service may reach its user
while no socket is open (an FCM registration token, or a browser's Web Push subscription), lists and
removes them; a backend (scope ``notify:admin``) sees and removes any user's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from .common import PublishError, TokenSource, _error_from, _HttpClient, _resolve


class DeviceError(PublishError):
    """The server refused a device request: ``status``, ``error`` and ``message`` are its answer
    (422 says what was wrong with the registration, 404 that push is not configured)."""


@dataclass(frozen=True, slots=True)
class Device:
    """A registered device as the server shows it: never its token, endpoint path or keys."""

    id: str
    kind: str  # "fcm" or "webpush"
    origin: str | None  # the push service of a Web Push device
    registered_at: int  # unix ms

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Device:
        return cls(body["id"], body["kind"], body.get("origin"), body["registered_at"])


class Devices(_HttpClient):
    """``PUT/GET/DELETE /me/devices`` with a user's token; ``/users/{user}/devices`` with an admin's.

    ``token`` is a JWT or a callable returning a current one (called before every request). A
    device id is the app's choice, 1 to 64 of ``A-Z a-z 0-9 _ -``: registering the same id again
    replaces the device (a rotated FCM token), a new one beyond the user's cap drops the least
    recently registered."""

    def __init__(
        self, base_url: str, token: TokenSource, *, timeout: float = 10.0, client: httpx.AsyncClient | None = None
    ) -> None:
        super().__init__(base_url, token, timeout, client)

    async def register_fcm(self, device_id: str, token: str) -> Device:
        """Register (or replace) an app's FCM registration token."""
        return Device.from_json(await self._call("PUT", _mine(device_id), {"kind": "fcm", "token": token}))

    async def register_webpush(self, device_id: str, subscription: dict[str, Any]) -> Device:
        """Register a browser's ``PushSubscription.toJSON()`` (notify.js's ``enablePush`` does this itself)."""
        body = {"kind": "webpush", "subscription": subscription}
        return Device.from_json(await self._call("PUT", _mine(device_id), body))

    async def list(self) -> list[Device]:
        """The user's devices, least recently registered first."""
        return [Device.from_json(d) for d in (await self._call("GET", "/me/devices"))["devices"]]

    async def remove(self, device_id: str) -> None:
        await self._call("DELETE", _mine(device_id))

    async def user_devices(self, user: str) -> list[Device]:
        """Any user's devices (scope ``notify:admin``)."""
        answer = await self._call("GET", f"/users/{quote(user, safe='')}/devices")
        return [Device.from_json(d) for d in answer["devices"]]

    async def remove_user_device(self, user: str, device_id: str) -> None:
        """Remove any user's device (scope ``notify:admin``)."""
        await self._call("DELETE", f"/users/{quote(user, safe='')}/devices/{quote(device_id, safe='')}")

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {await _resolve(self._token)}"}
        response = await self._http.request(method, self.base_url + path, json=body, headers=headers)
        if response.status_code >= 400:
            raise _error_from(response, DeviceError)
        return None if response.status_code == 204 else response.json()


def _mine(device_id: str) -> str:
    return f"/me/devices/{quote(device_id, safe='')}"
