"""Push settings: one clear line for every value that cannot work, `notify-service vapid`, and
GET /push/vapid answering the configured key (404 with none)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError

from service.config.settings import Settings

from .pushkit import public_of, vapid_pem
from .utils import ROOT, SECRET, refused_start, running, token

PEM = vapid_pem()
P384 = (
    ec.generate_private_key(ec.SECP384R1())
    .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    .decode()
)
WEB = {"vapid_private_key": PEM, "vapid_subject": "mailto:ops@example.com"}


def _file(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


REFUSED = [
    ({"vapid_private_key": "not a key", "vapid_subject": "mailto:a@b.c"}, "NOTIFY_VAPID_PRIVATE_KEY is not a PEM"),
    ({"vapid_private_key": P384, "vapid_subject": "mailto:a@b.c"}, "is not a P-256 key"),
    ({"vapid_private_key": PEM}, "NOTIFY_VAPID_SUBJECT is required"),
    ({**WEB, "vapid_subject": "http://example.com"}, "is not a mailto: or https: URL"),
    ({**WEB, "vapid_subject": "ops@example.com"}, "is not a mailto: or https: URL"),
    ({"vapid_subject": "mailto:a@b.c"}, "no VAPID key is"),
    ({**WEB, "vapid_private_key_file": "/nonexistent/vapid.pem"}, "are both set"),
    ({"vapid_private_key_file": "/nonexistent/vapid.pem", "vapid_subject": "mailto:a@b.c"}, "cannot be read"),
    ({"fcm_credentials_file": "/nonexistent/sa.json"}, "NOTIFY_FCM_CREDENTIALS_FILE '/nonexistent/sa.json' cannot"),
    ({"fcm_credentials_file": "@notjson"}, "is not JSON"),
    ({"fcm_credentials_file": "@user"}, "is not a service-account key file"),
    ({"fcm_credentials_file": "@partial"}, "lacks private_key, client_email, token_uri"),
    ({"fcm_credentials_file": "@badkey"}, "its private_key is not a PEM private key"),
    ({"fcm_endpoint": "https://fcm.example.com/v1"}, "NOTIFY_FCM_ENDPOINT: 'https://fcm.example.com/v1' is not an"),
    ({"fcm_endpoint": "https://*.example.com"}, "names no single host"),
    ({"push_allowed_origins": "https://push.example.com/path"}, "NOTIFY_PUSH_ALLOWED_ORIGINS: 'https://push.exam"),
    ({"push_allowed_origins": "ftp://push.example.com"}, "is not an origin"),
    ({"push_allowed_origins": " , "}, "NOTIFY_PUSH_ALLOWED_ORIGINS is empty"),
    ({"max_devices_per_user": 0}, "greater than 0"),
    ({"push_timeout_seconds": 0}, "greater than 0"),
    ({"push_timeout_seconds": 61}, "less than or equal to 60"),
]


@pytest.mark.parametrize(("values", "problem"), REFUSED, ids=[p for _, p in REFUSED])
def test_settings_refuse_what_cannot_work(tmp_path, values, problem):
    files = {
        "@notjson": _file(tmp_path, "a.json", "{nope"),
        "@user": _file(tmp_path, "b.json", json.dumps({"type": "authorized_user"})),
        "@partial": _file(tmp_path, "c.json", json.dumps({"type": "service_account", "project_id": "p"})),
        "@badkey": _file(
            tmp_path,
            "d.json",
            json.dumps(
                {
                    "type": "service_account",
                    "project_id": "p",
                    "private_key": "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
                    "client_email": "a@p.iam.gserviceaccount.com",
                    "token_uri": "https://oauth2.googleapis.com/token",
                }
            ),
        ),
    }
    values = {k: files.get(v, v) if isinstance(v, str) else v for k, v in values.items()}
    with pytest.raises(ValidationError) as refused:
        Settings(jwt_secret=SECRET, **values)
    assert problem in refused.value.errors()[0]["msg"]


def test_settings_read_the_push_options(tmp_path):
    settings = Settings(
        jwt_secret=SECRET,
        vapid_private_key=PEM.replace("\n", "\\n"),  # as an environment variable often carries it
        vapid_subject="https://example.com/contact",
        push_allowed_origins="https://push.example.com, http://127.0.0.1:9000,https://*.example.net",
        fcm_endpoint="http://127.0.0.1:9001/",
    )
    key = settings.vapid_key()
    assert key is not None and public_of(PEM) == public_of(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    )
    assert [(o.scheme, o.host, o.port) for o in settings.push_allowed_origins] == [
        ("https", "push.example.com", 443),
        ("http", "127.0.0.1", 9000),
        ("https", "*.example.net", 443),
    ]
    assert settings.fcm_endpoint == "http://127.0.0.1:9001"
    assert settings.max_devices_per_user == 10
    assert settings.push_timeout_seconds == 5.0
    defaults = Settings(jwt_secret=SECRET)
    assert [o.host for o in defaults.push_allowed_origins] == [
        "fcm.googleapis.com",
        "updates.push.services.mozilla.com",
        "web.push.apple.com",
        "*.notify.windows.com",
    ]
    assert {o.scheme for o in defaults.push_allowed_origins} == {"https"}
    assert defaults.vapid_key() is None


@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            {"NOTIFY_VAPID_PRIVATE_KEY": "garbage", "NOTIFY_VAPID_SUBJECT": "mailto:a@b.c"},
            "notify-service: NOTIFY_VAPID_PRIVATE_KEY is not a PEM private key (`notify-service vapid` makes one)",
        ),
        (
            {"NOTIFY_PUSH_ALLOWED_ORIGINS": "https://push.example.com/x"},
            "notify-service: NOTIFY_PUSH_ALLOWED_ORIGINS: 'https://push.example.com/x' is not an origin such as "
            "https://push.example.com",
        ),
        (
            {"NOTIFY_MAX_DEVICES_PER_USER": "0"},
            "notify-service: NOTIFY_MAX_DEVICES_PER_USER: Input should be greater than 0",
        ),
    ],
    ids=["key", "origins", "cap"],
)
def test_the_service_refuses_to_start(env, line):
    done = refused_start(env)
    assert done.returncode == 2
    assert done.stderr.strip() == line, done.stderr
    if "NOTIFY_VAPID_PRIVATE_KEY" in env:
        assert "garbage" not in done.stderr  # a key's text is never echoed


def test_a_key_from_notify_service_vapid_is_served_by_get_push_vapid(tmp_path):
    made = subprocess.run(
        [sys.executable, "-m", "service", "vapid"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    lines = made.stdout.strip().splitlines()
    pem = "\n".join(line for line in lines if not line.startswith("#"))
    pem, public = pem.rsplit("\n", 1)
    assert public_of(pem) == public
    key_file = tmp_path / "vapid.pem"
    key_file.write_text(pem)
    env = {"NOTIFY_VAPID_PRIVATE_KEY_FILE": str(key_file), "NOTIFY_VAPID_SUBJECT": "mailto:ops@example.com"}
    with running(env) as replica:
        answer = httpx.get(replica.url + "/push/vapid", timeout=10)
        assert answer.status_code == 200 and answer.json() == {"public_key": public}


def test_with_no_keys_the_push_api_answers_404(single):
    alice = {"Authorization": f"Bearer {token('alice')}"}
    admin = {"Authorization": f"Bearer {token('ops', 'notify:admin')}"}
    body = {"kind": "fcm", "token": "t" * 40}
    for method, path, headers in [
        ("GET", "/push/vapid", {}),
        ("GET", "/me/devices", alice),
        ("PUT", "/me/devices/d1", alice),
        ("DELETE", "/me/devices/d1", alice),
        ("GET", "/users/alice/devices", admin),
    ]:
        answer = httpx.request(method, single.url + path, headers=headers, json=body, timeout=10)
        assert answer.status_code == 404, (method, path, answer.text)
        assert answer.json()["error"] == "not_found"
