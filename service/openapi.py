"""Print the OpenAPI document of the app (`make openapi` writes it to openapi/openapi.json)."""

from __future__ import annotations

import json
from typing import Any

from .api.app import create_app
from .config.settings import Settings


def document() -> dict[str, Any]:
    """The OpenAPI document; independent of any real key or broker."""
    app = create_app(Settings(jwt_secret="openapi-document-only-0000000000000000"))  # type: ignore[arg-type]
    return app.openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
