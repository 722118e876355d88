"""The browser client (/client/notify.js), its Web Push service worker (/client/notify-sw.js) and, when
NOTIFY_DEMO is on, the demo page and its tokens."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..core.errors import NotFound
from .deps import RuntimeDep

router = APIRouter(tags=["client"])

STATIC = Path(__file__).resolve().parent.parent / "static"
_DEMO_TOKEN_SECONDS = 600


@router.get("/client/notify.js", response_class=FileResponse)
async def client_script() -> FileResponse:
    """The dependency-free browser client, an ES module."""
    return FileResponse(STATIC / "notify.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})


@router.get("/client/notify-sw.js", response_class=FileResponse)
async def service_worker() -> FileResponse:
    """The Web Push service worker: shows pushes, opens their url on click, closes them when read.
    It may control the whole origin (`Service-Worker-Allowed: /`), so a page can register it with scope `/`."""
    headers = {"Cache-Control": "no-cache", "Service-Worker-Allowed": "/"}
    return FileResponse(STATIC / "notify-sw.js", media_type="text/javascript", headers=headers)


@router.get("/demo", response_class=FileResponse, include_in_schema=False)
async def demo_page(runtime: RuntimeDep) -> FileResponse:
    if not runtime.settings.demo:
        raise NotFound("the demo is off (set NOTIFY_DEMO=true, as `make run` does)")
    return FileResponse(STATIC / "demo.html", media_type="text/html")


@router.get("/demo/tokens", include_in_schema=False)
async def demo_tokens(runtime: RuntimeDep, user: str = "demo") -> dict[str, str]:
    """Short-lived tokens for the demo page: one for its user, one to publish. Off unless NOTIFY_DEMO."""
    secret = runtime.settings.jwt_secret
    if not runtime.settings.demo or secret is None:
        raise NotFound("the demo is off (set NOTIFY_DEMO=true, as `make run` does)")
    exp = int(time.time()) + _DEMO_TOKEN_SECONDS
    key = secret.get_secret_value()
    return {
        "user": user,
        "client": jwt.encode({"sub": user, "exp": exp}, key, algorithm="HS256"),
        "publisher": jwt.encode({"sub": "demo-page", "scope": "notify:publish", "exp": exp}, key, algorithm="HS256"),
    }
