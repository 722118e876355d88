"""The push API: the VAPID public key, a user's own devices, and backends' view of a user's devices."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Response
from pydantic import BaseModel, ConfigDict, Field

from ..core.errors import NotFound
from ..push import Push
from ..push.devices import DEVICE_ID_PATTERN
from .body import JsonRoute
from .deps import AdminDep, ClientDep, RuntimeDep
from .models import USER_ID_PATTERN, ErrorBody

router = APIRouter(tags=["push"], route_class=JsonRoute)

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody, "description": "Push is not configured on this service."},
    503: {"model": ErrorBody, "description": "The broker is unreachable."},
}
DeviceId = Annotated[
    str, Path(pattern=DEVICE_ID_PATTERN, description="Chosen by the client: 1 to 64 of A-Z a-z 0-9 _ -.")
]
UserPath = Annotated[str, Path(min_length=1, max_length=256, pattern=USER_ID_PATTERN)]


class PushKeys(BaseModel):
    p256dh: str = Field(max_length=200, description="The subscription's P-256 public key, base64url.")
    auth: str = Field(max_length=100, description="Its 16-byte authentication secret, base64url.")


class PushSubscription(BaseModel):
    """The browser's `PushSubscription.toJSON()`, as it is."""

    model_config = ConfigDict(extra="ignore")

    endpoint: str = Field(max_length=2048)
    keys: PushKeys
    expirationTime: int | float | None = None  # noqa: N815 - the browser's name


class WebPushRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["webpush"]
    subscription: PushSubscription


class FcmRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["fcm"]
    token: str = Field(max_length=4096, description="The app's FCM registration token.")


Registration = Annotated[WebPushRegistration | FcmRegistration, Field(discriminator="kind")]


class DeviceView(BaseModel):
    """A registered device; never its endpoint's path, keys or token."""

    id: str
    kind: Literal["webpush", "fcm"]
    origin: str | None = Field(description="The push service a Web Push device is on; null for FCM.")
    registered_at: int = Field(description="Unix milliseconds.")


class DeviceList(BaseModel):
    devices: list[DeviceView] = Field(description="Least recently registered first.")


class VapidKey(BaseModel):
    public_key: str = Field(description="The uncompressed P-256 point, base64url: the browser's applicationServerKey.")


async def _push(runtime: RuntimeDep) -> Push:
    if runtime.push is None:
        raise NotFound("push is not configured on this service")
    return runtime.push


PushDep = Annotated[Push, Depends(_push)]


@router.get("/push/vapid", response_model=VapidKey, responses={404: _ERRORS[404]})
async def vapid_key(push: PushDep) -> VapidKey:
    """The VAPID public key browsers subscribe with (no token needed)."""
    if push.vapid is None:
        raise NotFound("Web Push is not configured on this service")
    return VapidKey(public_key=push.vapid.public_key)


@router.put("/me/devices/{device_id}", response_model=DeviceView, responses={**_ERRORS, 422: {"model": ErrorBody}})
async def register_device(device_id: DeviceId, body: Registration, principal: ClientDep, push: PushDep) -> DeviceView:
    """Register (or renew) one of the caller's devices. Beyond NOTIFY_MAX_DEVICES_PER_USER the least
    recently registered is dropped."""
    if isinstance(body, WebPushRegistration):
        fields = {"endpoint": body.subscription.endpoint, **body.subscription.keys.model_dump()}
    else:
        fields = {"token": body.token}
    device = push.device(device_id, body.kind, fields)
    await push.register(principal.user_id, device)
    return DeviceView(**device.view())


@router.get("/me/devices", response_model=DeviceList, responses=_ERRORS)
async def my_devices(principal: ClientDep, push: PushDep) -> DeviceList:
    """The caller's devices."""
    return DeviceList(devices=[DeviceView(**d.view()) for d in await push.devices.list(principal.user_id)])


@router.delete("/me/devices/{device_id}", status_code=204, response_class=Response, responses=_ERRORS)
async def remove_my_device(device_id: DeviceId, principal: ClientDep, push: PushDep) -> Response:
    """Forget one of the caller's devices (204 whether or not it was registered)."""
    await push.remove(principal.user_id, device_id)
    return Response(status_code=204)


@router.get("/users/{user_id:path}/devices", response_model=DeviceList, responses=_ERRORS)
async def user_devices(user_id: UserPath, admin: AdminDep, push: PushDep) -> DeviceList:
    """A user's devices, for backend services (scope `notify:admin`)."""
    return DeviceList(devices=[DeviceView(**d.view()) for d in await push.devices.list(user_id)])


@router.delete("/users/{user_id:path}/devices/{device_id}", status_code=204, response_class=Response, responses=_ERRORS)
async def remove_user_device(user_id: UserPath, device_id: DeviceId, admin: AdminDep, push: PushDep) -> Response:
    """Forget one of a user's devices (scope `notify:admin`; 204 whether or not it was registered)."""
    await push.remove(user_id, device_id)
    return Response(status_code=204)
