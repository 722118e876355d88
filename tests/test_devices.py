"""Devices: registration through the API, every refusal, the cap, one user's devices never another's,
backends' view; in memory on the embedded broker, and in Redis shared by replicas and surviving their
restarts, beside the user's stream (its hash tag)."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.client import DeviceError, Devices

from .pushkit import Subscription, service_account, vapid_pem
from .test_bodies import UNPARSEABLE
from .utils import RedisServer, Replica, cluster_env, running, started, token

ENDPOINT = "https://push.example.com/wpush/v2/abc"


def push_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    service_account(tmp_path / "sa.json", "http://127.0.0.1:9/token")  # never asked: nothing is sent here
    return {
        "NOTIFY_VAPID_PRIVATE_KEY": vapid_pem(),
        "NOTIFY_VAPID_SUBJECT": "mailto:ops@example.com",
        "NOTIFY_FCM_CREDENTIALS_FILE": str(tmp_path / "sa.json"),
        "NOTIFY_PUSH_ALLOWED_ORIGINS": "https://push.example.com,https://*.notify.windows.com",
        "NOTIFY_MAX_DEVICES_PER_USER": "3",
        **extra,
    }


def as_user(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


ADMIN = {"Authorization": f"Bearer {token('ops', 'notify:admin')}"}


def webpush(endpoint: str = ENDPOINT, **keys: str) -> dict[str, object]:
    subscription = Subscription(endpoint).to_json()
    subscription["keys"].update(keys)
    return {"kind": "webpush", "subscription": subscription}


def put(url: str, user: str, device_id: str, body: object) -> httpx.Response:
    return httpx.put(f"{url}/me/devices/{device_id}", headers=as_user(user), json=body, timeout=10)


def ids(url: str, user: str) -> list[str]:
    answer = httpx.get(f"{url}/me/devices", headers=as_user(user), timeout=10)
    assert answer.status_code == 200, answer.text
    return [d["id"] for d in answer.json()["devices"]]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    with running(push_env(tmp_path_factory.mktemp("push"))) as replica:
        yield replica


@pytest.mark.parametrize("what", list(UNPARSEABLE))
def test_unparseable_device_bodies_answer_422(embedded, what):
    """A device body that cannot be parsed, however it fails, is 422 invalid_request saying so, as on
    every other endpoint that takes a body (tests/test_bodies.py), and registers nothing."""
    body = b'{"kind":"fcm","token":' + UNPARSEABLE[what] + b"}"
    headers = {**as_user("unparsed"), "Content-Type": "application/json"}
    answer = httpx.put(f"{embedded.url}/me/devices/d1", headers=headers, content=body, timeout=10)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert answer.json()["message"].startswith("the body is not valid JSON: "), answer.text
    assert ids(embedded.url, "unparsed") == []


def test_register_list_and_remove_a_web_push_device(embedded):
    before = metric(embedded.url, 'notify_push_devices_total{change="removed",kind="webpush"}')
    answer = put(embedded.url, "reg-alice", "laptop_1", webpush())
    assert answer.status_code == 200, answer.text
    device = answer.json()
    assert device["id"] == "laptop_1" and device["kind"] == "webpush"
    assert device["origin"] == "https://push.example.com" and device["registered_at"] > 0
    assert "abc" not in answer.text  # the endpoint's path and the keys are never shown back
    fcm = put(embedded.url, "reg-alice", "pixel-8", {"kind": "fcm", "token": "cXk1:APA91b" + "Q" * 140})
    assert fcm.status_code == 200 and fcm.json()["origin"] is None and "APA91b" not in fcm.text
    assert ids(embedded.url, "reg-alice") == ["laptop_1", "pixel-8"]
    gone = httpx.delete(f"{embedded.url}/me/devices/laptop_1", headers=as_user("reg-alice"), timeout=10)
    assert gone.status_code == 204 and gone.content == b""
    assert ids(embedded.url, "reg-alice") == ["pixel-8"]
    assert metric(embedded.url, 'notify_push_devices_total{change="removed",kind="webpush"}') == before + 1
    again = httpx.delete(f"{embedded.url}/me/devices/laptop_1", headers=as_user("reg-alice"), timeout=10)
    assert again.status_code == 204


def _point_off_the_curve() -> str:
    x = y = (1).to_bytes(32, "big")
    return base64.urlsafe_b64encode(b"\x04" + x + y).rstrip(b"=").decode()


REFUSALS = [
    ("laptop", webpush(p256dh=_point_off_the_curve()), "p256dh is not an uncompressed point on P-256"),
    ("laptop", webpush(p256dh="BA" + "A" * 20), "p256dh is not an uncompressed point on P-256"),
    ("laptop", webpush(p256dh="not base64!"), "p256dh is not base64url"),
    ("laptop", webpush(auth=base64.urlsafe_b64encode(os.urandom(15)).decode()), "auth must be 16 bytes, not 15"),
    ("laptop", webpush(auth="%%"), "auth is not base64url"),
    ("laptop", webpush("https://evil.example.net/push"), "not on an allowed push service"),
    ("laptop", webpush("https://push.example.com.evil.net/x"), "not on an allowed push service"),
    ("laptop", webpush("https://push.example.com:8443/x"), "not on an allowed push service"),
    ("laptop", webpush("https://user@push.example.com/x"), "not on an allowed push service"),
    ("laptop", webpush("https://notify.windows.com/x"), "not on an allowed push service"),
    ("laptop", webpush("https://169.254.169.254/latest"), "not on an allowed push service"),
    ("laptop", webpush("http://push.example.com/x"), "must be an https URL"),
    ("laptop", webpush("file:///etc/passwd"), "must be an https URL"),
    ("pixel", {"kind": "fcm", "token": "short"}, "token is not an FCM registration token"),
    ("pixel", {"kind": "fcm", "token": "x" * 40 + " y"}, "token is not an FCM registration token"),
    ("pixel", {"kind": "apns", "token": "x" * 40}, "kind"),
    ("pixel", {"kind": "fcm"}, "token"),
    ("laptop", {"kind": "webpush", "subscription": {"endpoint": ENDPOINT}}, "subscription.keys"),
    ("a" * 65, {"kind": "fcm", "token": "x" * 40}, "device_id"),
    ("has.dot", {"kind": "fcm", "token": "x" * 40}, "device_id"),
]


@pytest.mark.parametrize(
    ("device_id", "body", "problem"), REFUSALS, ids=[p + f"-{i}" for i, (_, _, p) in enumerate(REFUSALS)]
)
def test_every_bad_registration_is_refused_with_what_was_wrong(embedded, device_id, body, problem):
    answer = put(embedded.url, "bad-alice", device_id, body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "invalid_request" and problem in answer.json()["message"]
    assert ids(embedded.url, "bad-alice") == []


def test_an_edge_subdomain_is_allowed_by_the_wildcard(embedded):
    assert (
        put(embedded.url, "wns-alice", "edge", webpush("https://wns2-par02p.notify.windows.com/w/?token=x")).status_code
        == 200
    )


def test_registering_beyond_the_cap_drops_the_least_recently_registered(embedded):
    for name in ("d1", "d2", "d3"):
        assert put(embedded.url, "cap-alice", name, webpush()).status_code == 200
    assert put(embedded.url, "cap-alice", "d1", webpush()).status_code == 200  # renewed: now the newest
    assert put(embedded.url, "cap-alice", "d4", webpush()).status_code == 200
    assert ids(embedded.url, "cap-alice") == ["d3", "d1", "d4"]
    counted = metric(embedded.url, 'notify_push_devices_total{change="dropped",kind="webpush"}')
    assert counted >= 1


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_one_users_devices_never_reach_another(embedded):
    assert put(embedded.url, "iso-alice", "shared-name", webpush()).status_code == 200
    assert ids(embedded.url, "iso-bob") == []
    # bob removing "his" device of the same name leaves alice's alone
    httpx.delete(f"{embedded.url}/me/devices/shared-name", headers=as_user("iso-bob"), timeout=10)
    assert ids(embedded.url, "iso-alice") == ["shared-name"]
    assert put(embedded.url, "iso-bob", "shared-name", {"kind": "fcm", "token": "b" * 40}).status_code == 200
    alice = httpx.get(f"{embedded.url}/users/iso-alice/devices", headers=ADMIN, timeout=10).json()["devices"]
    assert [d["kind"] for d in alice] == ["webpush"]


def test_backends_list_and_remove_a_users_devices_with_the_admin_scope(embedded):
    assert put(embedded.url, "adm/alice", "tablet", webpush()).status_code == 200
    listed = httpx.get(f"{embedded.url}/users/adm/alice/devices", headers=ADMIN, timeout=10)
    assert listed.status_code == 200 and [d["id"] for d in listed.json()["devices"]] == ["tablet"]
    reader = {"Authorization": f"Bearer {token('svc', 'notify:read notify:publish')}"}
    assert httpx.get(f"{embedded.url}/users/adm/alice/devices", headers=reader, timeout=10).status_code == 403
    assert (
        httpx.get(f"{embedded.url}/users/adm/alice/devices", headers=as_user("adm/alice"), timeout=10).status_code
        == 403
    )
    assert httpx.get(f"{embedded.url}/me/devices", timeout=10).status_code == 401
    removed = httpx.delete(f"{embedded.url}/users/adm/alice/devices/tablet", headers=ADMIN, timeout=10)
    assert removed.status_code == 204
    assert ids(embedded.url, "adm/alice") == []


@pytest.mark.slow
def test_devices_in_redis_are_shared_by_replicas_and_survive_their_restarts(own_redis: RedisServer, tmp_path):
    env = cluster_env(own_redis, **push_env(tmp_path))
    a, b = Replica(env), Replica(env)
    with started(a, b):
        assert put(a.url, "r-alice", "laptop", webpush()).status_code == 200
        assert put(b.url, "r-alice", "phone", {"kind": "fcm", "token": "p" * 40}).status_code == 200
        assert put(b.url, "r-bob", "laptop", webpush()).status_code == 200
        assert ids(a.url, "r-alice") == ids(b.url, "r-alice") == ["laptop", "phone"]
        for name in ("t1", "t2"):
            assert put(a.url, "r-alice", name, webpush()).status_code == 200
        assert ids(b.url, "r-alice") == ["phone", "t1", "t2"]  # the cap holds across replicas
        assert httpx.delete(f"{b.url}/me/devices/t1", headers=as_user("r-alice"), timeout=10).status_code == 204
    # Every replica stopped, then started again: the devices are where they were.
    with started(Replica(env), Replica(env)) as (c, d):
        assert ids(c.url, "r-alice") == ids(d.url, "r-alice") == ["phone", "t2"]
        assert ids(d.url, "r-bob") == ["laptop"]
    prefix = env["NOTIFY_REDIS_PREFIX"]
    client = redis.Redis(host="127.0.0.1", port=own_redis.port, decode_responses=True)
    keys = sorted(client.keys(f"{prefix}:*:d*"))
    client.close()
    # Beside each user's stream, under its hash tag: one slot per user, in a cluster too.
    assert keys == [
        f"{prefix}:{{u:r-alice}}:d",
        f"{prefix}:{{u:r-alice}}:do",
        f"{prefix}:{{u:r-bob}}:d",
        f"{prefix}:{{u:r-bob}}:do",
    ]


async def test_the_python_client_registers_lists_and_removes_fcm_devices(embedded):
    """`service.client.Devices`: an app registers its FCM token (again after FCM rotates it), lists
    and removes it; a refusal is a DeviceError with the server's reason; a backend sees and removes
    any user's devices with the admin scope, and a user's token cannot."""
    rotated = "cXk2:APA91b" + "R" * 140
    async with Devices(embedded.url, lambda: token("py-alice")) as devices:
        phone = await devices.register_fcm("pixel-7", "cXk1:APA91b" + "Q" * 140)
        assert (phone.id, phone.kind, phone.origin) == ("pixel-7", "fcm", None)
        await devices.register_fcm("pixel-7", rotated)
        subscription = Subscription(ENDPOINT).to_json()
        laptop = await devices.register_webpush("laptop", subscription)
        assert laptop.origin == "https://push.example.com"
        assert [d.id for d in await devices.list()] == ["pixel-7", "laptop"]
        with pytest.raises(DeviceError) as refused:
            await devices.register_fcm("pixel-8", "short")
        assert refused.value.status == 422 and "not an FCM registration token" in refused.value.message
        with pytest.raises(DeviceError) as forbidden:
            await devices.user_devices("py-alice")
        assert forbidden.value.status == 403
        await devices.remove("laptop")
        assert [d.id for d in await devices.list()] == ["pixel-7"]
    async with Devices(embedded.url, token("ops", "notify:admin")) as admin:
        assert [d.id for d in await admin.user_devices("py-alice")] == ["pixel-7"]
        await admin.remove_user_device("py-alice", "pixel-7")
        assert await admin.user_devices("py-alice") == []
