"""What `make run` prints before the server starts: tokens and commands to try it within a minute."""

from __future__ import annotations

import argparse
import time

import jwt

from .config.settings import Settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    ns = parser.parse_args()
    settings = Settings()
    assert settings.jwt_secret is not None
    secret = settings.jwt_secret.get_secret_value()
    exp = int(time.time()) + 8 * 3600

    def mint(sub: str, scope: str = "") -> str:
        claims: dict[str, object] = {"sub": sub, "exp": exp}
        if scope:
            claims["scope"] = scope
        return jwt.encode(claims, secret, algorithm="HS256")

    base = f"http://{ns.host}:{ns.port}"
    publisher, client = mint("dev-backend", "notify:publish notify:read"), mint("alice")
    print(
        f"""
  notify-service (development) on {base}; tokens below are valid for 8 hours.

  1. Open the demo:      {base}/demo
  2. Listen as alice:    .venv/bin/python -m websockets 'ws://{ns.host}:{ns.port}/ws?token={client}'
     (or SSE)            curl -N '{base}/events?token={client}'
  3. Notify alice:       curl -X POST {base}/notify/alice -H 'Authorization: Bearer {publisher}' \\
                              -H 'Content-Type: application/json' -d '{{"event":"hello","data":{{"n":1}}}}'
  More tokens:           NOTIFY_JWT_SECRET=$(cat .dev-secret) .venv/bin/notify-service token --sub bob
""",
        flush=True,
    )


if __name__ == "__main__":
    main()
