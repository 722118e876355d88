"""Dependencies shared by the routers: the runtime and the authenticated callers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth.tokens import ADMIN_SCOPE, PUBLISH_SCOPE, READ_SCOPE, Principal
from .runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="A JWT signed with the configured key.")


async def get_runtime(request: Request) -> Runtime:
    # async: a plain def dependency would cost a worker-thread hop on every request
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _service(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: the caller is a backend whose token (header only) carries `scope`."""

    async def principal(runtime: RuntimeDep, credentials: BearerDep) -> Principal:
        verified = await runtime.verifier.verify(credentials.credentials if credentials else None)
        verified.require(scope)
        return verified

    return principal


async def client(
    runtime: RuntimeDep,
    credentials: BearerDep,
    token: Annotated[str | None, Query(description="Client JWT, for clients that cannot set headers.")] = None,
) -> Principal:
    """A client: its token from `Authorization: Bearer`, else `?token=` (EventSource sets no headers)."""
    return await runtime.verifier.verify(credentials.credentials if credentials else token)


PublisherDep = Annotated[Principal, Depends(_service(PUBLISH_SCOPE))]
ReaderDep = Annotated[Principal, Depends(_service(READ_SCOPE))]
AdminDep = Annotated[Principal, Depends(_service(ADMIN_SCOPE))]
ClientDep = Annotated[Principal, Depends(client)]
