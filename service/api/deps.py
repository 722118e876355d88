"""Dependencies shared by the routers: the runtime and the authenticated callers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import PUBLISH_SCOPE, READ_SCOPE, Principal
from ..runtime import Runtime

_bearer = HTTPBearer(auto_error=False, description="A JWT signed with the configured key.")


async def get_runtime(request: Request) -> Runtime:
    # async: a plain def dependency would cost a worker-thread hop on every request
    runtime: Runtime = request.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def bearer_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The token from `Authorization: Bearer`, else from `?token=` (browsers cannot set headers on EventSource)."""
    if credentials is not None:
        return credentials.credentials
    return request.query_params.get("token")


async def publisher(request: Request, runtime: RuntimeDep, credentials: BearerDep) -> Principal:
    principal = await runtime.verifier.verify(credentials.credentials if credentials else None)
    principal.require(PUBLISH_SCOPE)
    return principal


async def reader(request: Request, runtime: RuntimeDep, credentials: BearerDep) -> Principal:
    principal = await runtime.verifier.verify(credentials.credentials if credentials else None)
    principal.require(READ_SCOPE)
    return principal


async def client(
    request: Request,
    runtime: RuntimeDep,
    credentials: BearerDep,
    token: Annotated[str | None, Query(description="Client JWT, for clients that cannot set headers.")] = None,
) -> Principal:
    return await runtime.verifier.verify(bearer_token(request, credentials))


PublisherDep = Annotated[Principal, Depends(publisher)]
ReaderDep = Annotated[Principal, Depends(reader)]
ClientDep = Annotated[Principal, Depends(client)]
