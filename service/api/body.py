"""JSON request bodies, parsed the way the publish fast path parses them.

FastAPI parses a JSON body with `json.loads` and answers 400 "There was an error parsing the
body" for whatever that raises besides a syntax error: a body nested thousands deep
(RecursionError), a number of thousands of digits, bytes that are not UTF-8. It also takes
NaN and Infinity, which are not JSON. Routes built with `JsonRoute` parse with pydantic's JSON
parser instead, the one behind `model_validate_json` on the fast path, so every way a body can
fail is a syntax error to FastAPI, hence 422 invalid_request, and both paths accept the same bodies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute

# What pydantic's parser says, and what the caller should hear.
_PLAIN = {
    "recursion limit exceeded": "nested too deeply",
    "number out of range": "a number is too large",
    "invalid unicode code point": "not valid UTF-8",
}


def describe(reason: str) -> str:
    """The reason a body is not JSON, in the caller's terms where pydantic's are obscure."""
    for found, plain in _PLAIN.items():
        if reason.startswith(found):
            return f"{plain} ({reason})"
    return reason


class JsonBodyRequest(Request):
    async def json(self) -> Any:
        # Cached under a name of our own: Starlette's cache (`_json`) is none of our business.
        if not hasattr(self, "_parsed_json"):
            try:
                self._parsed_json = pydantic_core.from_json(await self.body(), allow_inf_nan=False)
            except ValueError as exc:
                # The one exception FastAPI turns into a validation error (422) instead of a 400.
                raise json.JSONDecodeError(describe(str(exc)), "", 0) from None
        return self._parsed_json


class JsonRoute(APIRoute):
    """An APIRoute whose JSON body is read by `JsonBodyRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def handle(request: Request) -> Response:
            return await handler(JsonBodyRequest(request.scope, request.receive))

        return handle
