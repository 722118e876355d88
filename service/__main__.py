"""Command line: serve (default), mint a development token, publish, or listen.

    python -m service --host 127.0.0.1 --port 8000          (same as `notify-service serve ...`)
    notify-service token --sub alice --scope notify:publish
    notify-service send alice order.shipped '{"n":1}' [--url http://127.0.0.1:8000] [--token JWT]
    notify-service broadcast maintenance '{"in_minutes":5}'
    notify-service listen --token JWT [--url ws://127.0.0.1:8000/ws ...]   (or --sub alice)
    notify-service vapid                                     (a new Web Push key pair)

`send`, `broadcast` and `listen` without --token mint one from NOTIFY_JWT_SECRET (development).
`listen` prints one JSON line per notification on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from pydantic import ValidationError

DEFAULT_HTTP_URL = "http://127.0.0.1:8000"
DEFAULT_WS_URL = "ws://127.0.0.1:8000/ws"
_SUBCOMMANDS = (
    "subcommands: serve (default), token, send, broadcast, listen, vapid; see `notify-service COMMAND --help`"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else ""
    if command == "token":
        return _token(args[1:])
    if command in ("send", "broadcast"):
        return _send(command, args[1:])
    if command == "listen":
        return _listen(args[1:])
    if command == "vapid":
        return _vapid(args[1:])
    return _serve(args[1:] if command == "serve" else args)


def _load_settings():  # type: ignore[no-untyped-def]
    from pydantic_settings import SettingsError

    from .config.settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"] and not message.startswith("NOTIFY_"):
            # Which setting, and where inside a JSON one: NOTIFY_TOPICS chat.bogus: ...
            name, *inside = map(str, first["loc"])
            message = f"NOTIFY_{name.upper()}{' ' + '.'.join(inside) if inside else ''}: {message}"
        print(f"notify-service: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except SettingsError as exc:
        print(f"notify-service: {exc} (it must be valid JSON)", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="notify-service", description="Run one replica.", epilog=_SUBCOMMANDS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    ns = parser.parse_args(argv)
    settings = _load_settings()
    from .broker.redis.connector import refuse_non_cluster_seeds
    from .server.runner import build_server

    problem = refuse_non_cluster_seeds(settings)
    if problem is not None:
        print(f"notify-service: {problem}", file=sys.stderr)
        raise SystemExit(2)
    build_server(settings, ns.host, ns.port).run()
    return 0


def _mint(sub: str, scope: str = "", ttl: int = 3600) -> str:
    """A JWT signed with NOTIFY_JWT_SECRET, with the configured audience and issuer."""
    settings = _load_settings()
    if settings.jwt_secret is None:
        print("notify-service: minting a token needs NOTIFY_JWT_SECRET (or pass --token)", file=sys.stderr)
        raise SystemExit(2)
    import jwt

    now = int(time.time())
    claims: dict[str, object] = {"sub": sub, "exp": now + ttl, "iat": now}
    if scope:
        claims["scope"] = scope
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret.get_secret_value(), algorithm="HS256")


def _token(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="notify-service token", description="Print a JWT signed with NOTIFY_JWT_SECRET (for development)."
    )
    parser.add_argument("--sub", required=True, help="user id (clients) or service name (publishers)")
    parser.add_argument("--scope", default="", help='space-separated scopes, e.g. "notify:publish notify:read"')
    parser.add_argument("--ttl", type=int, default=3600, help="seconds until the token expires")
    ns = parser.parse_args(argv)
    print(_mint(ns.sub, ns.scope, ns.ttl))
    return 0


def _vapid(argv: list[str]) -> int:
    argparse.ArgumentParser(
        prog="notify-service vapid",
        description="Print a new VAPID key pair for Web Push: the private key (PEM) and the public key.",
    ).parse_args(argv)
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    point = key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    print("# NOTIFY_VAPID_PRIVATE_KEY (or this saved to a file named by NOTIFY_VAPID_PRIVATE_KEY_FILE):")
    print(pem.decode().strip())
    print("# its public key, as GET /push/vapid answers it (the browser's applicationServerKey):")
    print(base64.urlsafe_b64encode(point).rstrip(b"=").decode())
    return 0


def _send(command: str, argv: list[str]) -> int:
    broadcast = command == "broadcast"
    parser = argparse.ArgumentParser(
        prog=f"notify-service {command}",
        description="Broadcast a notification to every user." if broadcast else "Send a notification to one user.",
    )
    if not broadcast:
        parser.add_argument("user", help="the recipient's user id")
    parser.add_argument("event", help="event name, e.g. order.shipped")
    parser.add_argument("data", nargs="?", default="null", help="the notification's data as JSON (default null)")
    parser.add_argument(
        "--url",
        default=os.environ.get("NOTIFY_URL", DEFAULT_HTTP_URL),
        help=f"the service's base URL (default $NOTIFY_URL or {DEFAULT_HTTP_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("NOTIFY_TOKEN"),
        help="a JWT with scope notify:publish (default $NOTIFY_TOKEN, else one minted from NOTIFY_JWT_SECRET)",
    )
    parser.add_argument("--idempotency-key", help="retries with the same key deliver once (default: a new key)")
    parser.add_argument("--attempts", type=int, default=6, help="tries on 503 or network errors (default 6)")
    ns = parser.parse_args(argv)
    try:
        data = json.loads(ns.data)
    except ValueError as exc:
        parser.error(f"DATA is not valid JSON: {exc}")
    token = ns.token or _mint("notify-cli", "notify:publish", 300)

    import asyncio

    from .client import Publisher, PublishError

    async def run() -> Any:
        async with Publisher(ns.url, token, max_attempts=max(1, ns.attempts)) as publisher:
            if broadcast:
                return await publisher.broadcast(ns.event, data, idempotency_key=ns.idempotency_key)
            return await publisher.notify(ns.user, ns.event, data, idempotency_key=ns.idempotency_key)

    try:
        accepted = asyncio.run(run())
    except PublishError as exc:
        print(f"notify-service: {exc}", file=sys.stderr)
        return 1
    result = {"id": accepted.id, "ts": accepted.ts, "duplicate": accepted.duplicate}
    if accepted.online is not None:
        result["online"] = accepted.online
    print(json.dumps(result))
    return 0


def _listen(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="notify-service listen",
        description="Print the user's notifications as JSON lines, reconnecting and resuming as needed.",
    )
    parser.add_argument(
        "--url",
        action="append",
        default=None,
        help=f"socket URL; repeat to rotate between replicas (default $NOTIFY_WS_URL or {DEFAULT_WS_URL})",
    )
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--token", default=os.environ.get("NOTIFY_TOKEN"), help="the user's JWT (default $NOTIFY_TOKEN)")
    who.add_argument("--sub", help="mint short-lived tokens for this user from NOTIFY_JWT_SECRET (development)")
    parser.add_argument("--since", help="resume after this notification id")
    parser.add_argument("--broadcast-since", help="resume broadcasts after this id")
    parser.add_argument("--count", type=int, default=None, help="exit after this many notifications")
    parser.add_argument("-v", "--verbose", action="store_true", help="log connection changes on stderr")
    ns = parser.parse_args(argv)
    urls = ns.url or [os.environ.get("NOTIFY_WS_URL", DEFAULT_WS_URL)]
    if ns.sub:
        sub = ns.sub
        _mint(sub, ttl=60)  # fail now, not at the first connect, when no secret is configured
        token: Any = lambda: _mint(sub, ttl=3600)  # noqa: E731 - a fresh token at every reconnect or refresh
    elif ns.token:
        token = ns.token
    else:
        parser.error("give --token (or $NOTIFY_TOKEN), or --sub with NOTIFY_JWT_SECRET set")
    if ns.verbose:
        import logging

        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")

    import asyncio
    import signal

    from .client import ListenerError, listen

    async def run() -> int:
        listener = listen(urls, token, since=ns.since, broadcast_since=ns.broadcast_since)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        count = 0
        try:
            async for notification in listener:
                sys.stdout.write(json.dumps(notification.frame, separators=(",", ":")) + "\n")
                sys.stdout.flush()
                count += 1
                if ns.count is not None and count >= ns.count:
                    break
        except asyncio.CancelledError:
            return 0
        except ListenerError as exc:
            print(f"notify-service: {exc}", file=sys.stderr)
            return 1
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    raise SystemExit(main())
