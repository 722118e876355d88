"""Firebase Cloud Messaging, HTTP v1 (`projects/<id>/messages:send`).

The bearer token is google-auth's: it signs the service account's assertion, asks the credentials
file's `token_uri`, and refreshes the token before it expires. google-auth's token exchange runs on
its own small transport (`_Transport`, httpx underneath, no redirects, a bounded answer), in a worker
thread, once per refresh, never per push.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import orjson
from google.auth import transport
from google.oauth2 import service_account

from ..egress import Client, HTTPError
from .devices import Device
from .outcome import MAX_ANSWER_BYTES, Outcome, by_status, guarded_post
from .webpush import PushMessage

logger = logging.getLogger("service.push")

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
_GONE = ("UNREGISTERED", "NOT_FOUND")


class _Response(transport.Response):
    def __init__(self, response: httpx.Response, body: bytes) -> None:
        self._response = response
        self._body = body

    @property
    def status(self) -> int:
        return self._response.status_code

    @property
    def headers(self) -> Any:
        return self._response.headers

    @property
    def data(self) -> bytes:
        return self._body


class _Transport(transport.Request):
    """google-auth's HTTP transport interface over httpx (its own adapters need `requests`)."""

    def __init__(self, client: httpx.Client, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    def __call__(
        self,
        url: str,
        method: str = "GET",
        body: Any = None,
        headers: Any = None,
        timeout: Any = None,
        **kwargs: Any,
    ) -> transport.Response:
        try:
            request = self._client.build_request(
                method, url, content=body, headers=headers, timeout=timeout or self._timeout
            )
            response = self._client.send(request, stream=True, follow_redirects=False)
            try:
                data = b""
                for chunk in response.iter_raw():
                    data += chunk
                    if len(data) >= MAX_ANSWER_BYTES:
                        break
                return _Response(response, data[:MAX_ANSWER_BYTES])
            finally:
                response.close()
        except httpx.HTTPError as exc:
            from google.auth.exceptions import TransportError

            raise TransportError(f"the token endpoint could not be reached: {type(exc).__name__}") from exc


def fcm_message(token: str, message: PushMessage) -> dict[str, Any]:
    """The v1 message: a notification the device shows, data for the app, the link for web clients."""
    data = {"id": message.id, "event": message.event, "data": orjson.dumps(message.data).decode()}
    notification = {"title": message.title}
    if message.body is not None:
        notification["body"] = message.body
    if message.url is not None:
        data["url"] = message.url
    body: dict[str, Any] = {
        "token": token,
        "notification": notification,
        "data": data,
        "android": {"ttl": f"{max(0, message.ttl)}s"},
    }
    if message.url is not None:
        body["webpush"] = {"fcm_options": {"link": message.url}}
    return {"message": body}


class FcmSender:
    """Sends one message to one FCM device and says what came of it."""

    def __init__(self, credentials_file: str, endpoint: str, client: Client, timeout: float) -> None:
        self._credentials = service_account.Credentials.from_service_account_file(credentials_file, scopes=[SCOPE])
        self._url = f"{endpoint}/v1/projects/{self._credentials.project_id}/messages:send"
        self._client = client
        self._timeout = timeout
        self._token_client = httpx.Client(follow_redirects=False)
        self._refreshing = asyncio.Lock()

    async def aclose(self) -> None:
        await asyncio.to_thread(self._token_client.close)

    async def _token(self) -> str:
        async with self._refreshing:
            if not self._credentials.valid:  # none yet, or expiring: google-auth keeps a margin
                await asyncio.to_thread(self._credentials.refresh, _Transport(self._token_client, self._timeout))
        return str(self._credentials.token)

    async def send(self, device: Device, message: PushMessage) -> Outcome:
        assert device.kind == "fcm" and device.token
        try:
            token = await self._token()
        except Exception as exc:  # noqa: BLE001 - google-auth raises several kinds; all mean "not now"
            logger.warning("fcm: no access token: %s", type(exc).__name__)
            return Outcome("retry", None, "no FCM access token")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        body = orjson.dumps(fcm_message(device.token, message))
        try:
            answer = await guarded_post(self._client, self._url, None, headers, body, self._timeout)
        except HTTPError as exc:
            outcome = Outcome("retry", None, f"FCM could not be reached: {exc}")
        else:
            outcome = by_status(answer)
            code = _error_code(answer.body) if outcome.result != "sent" else None
            if answer.status == 401:
                # The token was refused before its expiry (revoked, or the clock is off): the next
                # attempt gets a new one.
                self._credentials.token = None
                outcome = Outcome("retry", 401, "FCM refused the access token")
            elif code in _GONE or (answer.status == 404 and code is None):
                outcome = Outcome("gone", answer.status, f"the token is no longer registered ({code or 404})")
            elif code is not None:
                outcome = Outcome(outcome.result, outcome.status, f"{outcome.reason}: {code}", outcome.retry_after)
        if outcome.result != "sent":
            logger.info("fcm push to device %s: %s (%s)", device.id, outcome.result, outcome.reason)
        return outcome


def _error_code(body: bytes) -> str | None:
    """FCM's error code (`details[].errorCode`), else the error's status; None if neither is there."""
    try:
        error = orjson.loads(body).get("error") or {}
        for detail in error.get("details") or []:
            if isinstance(detail, dict) and isinstance(detail.get("errorCode"), str):
                return str(detail["errorCode"])
        status = error.get("status")
        return str(status) if isinstance(status, str) else None
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        return None
