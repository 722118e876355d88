"""Command line: serve (default), or mint a development token.

    python -m service --host 127.0.0.1 --port 8000
    notify-service token --sub alice --scope notify:publish
"""

from __future__ import annotations

import argparse
import sys
import time

from pydantic import ValidationError


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "token":
        return _token(args[1:])
    return _serve(args[1:] if args and args[0] == "serve" else args)


def _load_settings():  # type: ignore[no-untyped-def]
    from .settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"notify-service: {first['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="notify-service", description="Run one replica.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    ns = parser.parse_args(argv)
    settings = _load_settings()
    from .server import build_server

    build_server(settings, ns.host, ns.port).run()
    return 0


def _token(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="notify-service token", description="Print a JWT signed with NOTIFY_JWT_SECRET (for development)."
    )
    parser.add_argument("--sub", required=True, help="user id (clients) or service name (publishers)")
    parser.add_argument("--scope", default="", help='space-separated scopes, e.g. "notify:publish notify:read"')
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until the token expires")
    ns = parser.parse_args(argv)
    settings = _load_settings()
    if settings.jwt_secret is None:
        print("notify-service: token needs NOTIFY_JWT_SECRET", file=sys.stderr)
        return 2
    import jwt

    claims: dict[str, object] = {"sub": ns.sub, "exp": int(time.time()) + ns.ttl, "iat": int(time.time())}
    if ns.scope:
        claims["scope"] = ns.scope
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    print(jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
