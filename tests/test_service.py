"""Start-up, health, metrics and the published OpenAPI document."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

from service.openapi import render

from .receiver import new_secret
from .utils import ROOT, SECRET, Client, publish


def test_openapi_file_is_current():
    """openapi/openapi.json is what the code serves; run `make openapi` after changing the API."""
    on_disk = (ROOT / "openapi" / "openapi.json").read_text()
    assert on_disk == render(), "openapi/openapi.json is stale: run `make openapi`"


def test_refuses_to_start_without_a_key():
    """With no JWT key configured the service exits at once with one clear line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "1"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NOTIFY_JWT_SECRET" in lines[0], result.stderr


def test_refuses_a_short_secret():
    env = {**os.environ, "NOTIFY_JWT_SECRET": "short"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 2 and "too short" in result.stderr


def test_refuses_bad_webhook_settings():
    """A bad endpoint or delay list stops start-up with one line naming the setting, never the secret."""
    secret = new_secret()
    cases = {
        "NOTIFY_WEBHOOKS": (json.dumps([{"url": "ftp://x", "secret": secret}]), "0.url"),
        "NOTIFY_WEBHOOK_RETRY_SECONDS": ("5,soon", "seconds separated by commas"),
    }
    cases_secret = json.dumps([{"url": "http://127.0.0.1:9/h", "secret": "whsec_" + "A" * 8}])
    for name, (value, expected) in [*cases.items(), ("NOTIFY_WEBHOOKS", (cases_secret, "24 to 64 bytes"))]:
        result = subprocess.run(
            [sys.executable, "-m", "service", "--port", "1"],
            env={**os.environ, "NOTIFY_JWT_SECRET": SECRET, name: value},
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert name in lines[0] and expected in lines[0] and secret not in lines[0], lines[0]


async def test_health_ready_and_metrics(single, http):
    """healthz and readyz answer 200; /metrics counts connections, publishes and deliveries."""
    assert (await http.get(single.url + "/healthz")).json()["status"] == "ok"
    ready = await http.get(single.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client = await Client.connect(single, "metrics-user")
    await client.welcome()
    await publish(http, single, "metrics-user", "m")
    await client.notifications(1)
    text = (await http.get(single.url + "/metrics")).text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and not line.startswith("#")
    }
    assert samples["notify_connections"] >= 1
    assert samples['notify_notifications_published_total{kind="user"}'] >= 1
    assert samples["notify_notifications_delivered_total"] >= 1
    assert "notify_delivery_latency_seconds_bucket" in text and "notify_broker_reconnects_total" in text
    await client.close()


async def test_tokens_never_reach_the_log(single, http):
    """The token in ?token= is redacted from every log line, including uvicorn's own."""
    from .utils import Replica, token

    replica = Replica({"NOTIFY_LOG_LEVEL": "info"}).start()
    try:
        secret_token = token("log-user")
        client = await Client.connect(replica, "log-user")
        await client.welcome()
        await client.close()
        await http.get(f"{replica.url}/me/notifications?token={secret_token}")
        await http.get(f"{replica.url}/healthz", headers={"Authorization": f"Bearer {secret_token}"})
        output = replica.output()
        assert "[redacted]" in output
        assert secret_token.split(".")[2] not in output
        for line in output.splitlines():
            if line.startswith("{"):
                json.loads(line)  # structured JSON lines
    finally:
        replica.stop()


async def test_every_request_is_logged_once_with_its_request_id(http):
    """A publish answered on the fast path and one answered by the framework (a 422) each give one
    access line with the caller's request id, which the answer echoes; the 202's names its notification."""
    from .utils import Replica, publisher_headers

    replica = Replica({"NOTIFY_LOG_LEVEL": "info", "NOTIFY_ACCESS_LOG": "all"}).start()
    try:
        url = f"{replica.url}/notify/log-user"
        fast = await http.post(url, json={"event": "e"}, headers={**publisher_headers(), "X-Request-ID": "req-fast"})
        slow = await http.post(url, json={"data": 1}, headers={**publisher_headers(), "X-Request-ID": "req-slow"})
        assert fast.status_code == 202 and fast.headers["x-request-id"] == "req-fast"
        assert slow.status_code == 422 and slow.headers["x-request-id"] == "req-slow"
        # Without one, each request gets an id of its own (16 hex digits), on either path.
        made = [
            (await http.post(url, json=body, headers=publisher_headers())).headers["x-request-id"]
            for body in ({"event": "e"}, {"event": "e"}, {"data": 1})
        ]
        assert len(set(made)) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", rid) for rid in made)
        access: dict[str, dict] = {}
        for _ in range(50):  # the line is written just after the answer leaves
            lines = [json.loads(line) for line in replica.output().splitlines() if line.startswith("{")]
            access = {}
            for line in lines:
                if line["logger"] == "service.access" and line["path"] == "/notify/log-user":
                    assert line["request_id"] not in access, f"logged twice: {line}"
                    access[line["request_id"]] = line
            if len(access) == 5:
                break
            await asyncio.sleep(0.05)
        assert access["req-fast"]["status"] == 202 and access["req-fast"]["notification_id"] == fast.json()["id"]
        assert access["req-slow"]["status"] == 422 and "notification_id" not in access["req-slow"]
        assert [access[rid]["status"] for rid in made] == [202, 202, 422]
    finally:
        replica.stop()


async def test_cors_allows_configured_origins_only(http):
    """Browsers on an allowed origin may call the inbox with a bearer token; other origins get no grant."""
    from .utils import Replica

    replica = Replica({"NOTIFY_ALLOWED_ORIGINS": "https://app.example"}).start()
    try:
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        }
        ok = await http.options(replica.url + "/me/notifications", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        evil = await http.options(
            replica.url + "/me/notifications", headers={**preflight, "Origin": "https://evil.example"}
        )
        assert "access-control-allow-origin" not in evil.headers
    finally:
        replica.stop()


def test_webhook_secrets_are_never_shown():
    """Settings printed, logged or dumped as JSON never carry a webhook secret."""
    from service.config.settings import Settings

    secret = new_secret()
    settings = Settings(jwt_secret=SECRET, webhooks=[{"url": "http://127.0.0.1:9/h", "secret": [secret]}])  # type: ignore[arg-type, list-item]
    for shown in (str(settings), repr(settings), str(settings.webhooks[0]), settings.model_dump_json()):
        assert secret not in shown and secret[6:] not in shown
