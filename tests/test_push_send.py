"""The push senders against real local servers: what a push service receives decrypts with the
subscription's keys and carries a VAPID JWT that verifies; FCM gets google-auth's bearer token and the
v1 message; every answer is classified; redirects are not followed and no disallowed origin is called."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.broker.redis.broker import RedisBroker
from service.config.push_options import parse_origin
from service.config.settings import Settings
from service.core.errors import InvalidRequest
from service.core.topics import Topics
from service.egress import Client
from service.push import Device, Push, PushMessage, PushTooLarge
from service.push.outcome import MAX_ANSWER_BYTES, guarded_post
from service.push.webpush import MAX_ENCRYPTED_BYTES, check_size, encrypt, encrypted_size, topic
from service.telemetry.metrics import Metrics

from .pushkit import Google, PushService, Subscription, public_of, service_account, vapid_pem
from .utils import SECRET

PEM = vapid_pem()
SUBJECT = "mailto:ops@example.com"


def message(**extra: object) -> PushMessage:
    fields: dict[str, object] = {
        "id": "1764079200000-1",
        "event": "order.shipped",
        "title": "Your order shipped",
        "ts": 1764079200000,
        "ttl": 3600,
        "body": "Arrives Tuesday",
        "url": "https://shop.example.com/orders/7",
        "icon": "https://shop.example.com/icon.png",
        "tag": "order-7",
        "data": {"order": 7},
    }
    fields.update(extra)
    return PushMessage(**fields)  # type: ignore[arg-type]


@pytest.fixture
def push_service() -> Iterator[PushService]:
    with PushService().running() as service:
        yield service


@pytest.fixture
def google(tmp_path: Path) -> Iterator[Google]:
    server = Google()
    with server.running():
        server.account_key = service_account(tmp_path / "sa.json", server.token_uri)
        yield server


def web_push_settings(push_service: PushService, **more: Any) -> Settings:
    """Web Push configured with the test's key, sending to the local push service only."""
    return Settings(
        jwt_secret=SECRET,
        vapid_private_key=PEM,
        vapid_subject=SUBJECT,
        push_allowed_origins=push_service.origin,
        **more,
    )


@pytest.fixture
async def push(push_service: PushService, google: Google, tmp_path: Path) -> AsyncIterator[Push]:
    settings = web_push_settings(
        push_service, fcm_credentials_file=str(tmp_path / "sa.json"), fcm_endpoint=google.origin
    )
    instance = Push(settings, broker=None, metrics=Metrics("test"))
    yield instance
    await instance.aclose()


def web_device(push: Push, subscription: Subscription, device_id: str = "laptop") -> Device:
    keys = subscription.to_json()["keys"]
    return push.device(device_id, "webpush", {"endpoint": subscription.endpoint, **keys})


async def test_a_web_push_decrypts_with_the_subscription_keys_and_its_vapid_jwt_verifies(push, push_service):
    subscription = Subscription(push_service.endpoint("a1"))
    outcome = await push.send("alice", web_device(push, subscription), message())
    assert outcome.result == "sent" and outcome.status == 201
    (request,) = push_service.wait_for(1)
    assert request.path == "/push/a1"
    assert request.headers["ttl"] == "3600"
    assert request.headers["urgency"] == "normal"
    assert request.headers["topic"] == "order-7"
    assert request.headers["content-encoding"] == "aes128gcm"
    assert subscription.decrypt(request.body) == {
        "id": "1764079200000-1",
        "event": "order.shipped",
        "title": "Your order shipped",
        "body": "Arrives Tuesday",
        "url": "https://shop.example.com/orders/7",
        "icon": "https://shop.example.com/icon.png",
        "tag": "order-7",
        "data": {"order": 7},
        "ts": 1764079200000,
    }
    push_service.verify_vapid(request, public_of(PEM), SUBJECT)
    assert push.vapid is not None and push.vapid.public_key == public_of(PEM)


async def test_each_push_is_encrypted_afresh_and_a_long_tag_becomes_a_stable_topic(push, push_service):
    subscription = Subscription(push_service.endpoint("a2"))
    device = web_device(push, subscription)
    long_tag = "thread:" + "x" * 60
    for _ in range(2):
        assert (await push.send("alice", device, message(tag=long_tag))).result == "sent"
    first, second = push_service.wait_for(2)
    assert first.body != second.body  # a new salt and ephemeral key each time
    assert subscription.decrypt(first.body) == subscription.decrypt(second.body)
    assert first.headers["topic"] == second.headers["topic"] == topic(long_tag)
    assert len(first.headers["topic"]) == 32 and first.headers["topic"] != long_tag[:32]
    assert "topic" not in (await _sent_without_tag(push, push_service)).headers


async def _sent_without_tag(push: Push, push_service: PushService):  # type: ignore[no-untyped-def]
    await push.send("alice", web_device(push, Subscription(push_service.endpoint("a3"))), message(tag=None))
    return push_service.wait_for(3)[-1]


@pytest.mark.parametrize(
    ("status", "headers", "result", "retry_after"),
    [
        (200, {}, "sent", None),
        (404, {}, "gone", None),
        (410, {}, "gone", None),
        (429, {"Retry-After": "7"}, "retry", 7.0),
        (503, {}, "retry", None),
        (500, {"Retry-After": "2"}, "retry", 2.0),
        (400, {}, "failed", None),
        (413, {}, "failed", None),
    ],
)
async def test_web_push_answers_are_classified(push, push_service, caplog, status, headers, result, retry_after):
    subscription = Subscription(push_service.endpoint(f"s{status}"))
    push_service.status[f"/push/s{status}"] = (status, headers, b"")
    with caplog.at_level(logging.INFO, logger="service.push"):
        outcome = await push.send("alice", web_device(push, subscription, "phone-1"), message())
    assert (outcome.result, outcome.status, outcome.retry_after) == (result, status, retry_after)
    if result != "sent":
        logged = caplog.text
        assert "phone-1" in logged
        assert "/push/" not in logged and subscription.auth not in logged  # the endpoint's secrets never


async def test_a_redirecting_push_service_is_not_followed(push, push_service):
    with PushService().running() as elsewhere:
        push_service.status["/push/r"] = (307, {"Location": elsewhere.endpoint("stolen")}, b"")
        outcome = await push.send("alice", web_device(push, Subscription(push_service.endpoint("r"))), message())
        assert outcome.result == "failed" and outcome.status == 307
        assert push_service.wait_for(1) and elsewhere.received == []


async def test_a_device_outside_the_allowed_origins_is_never_called(push):
    # Registered while the operator allowed its origin, which is no longer listed.
    with PushService().running() as other:
        subscription = Subscription(other.endpoint("x"))
        device = Device("old", "webpush", 0, other.endpoint("x"), subscription.p256dh, subscription.auth)
        outcome = await push.send("alice", device, message())
        assert outcome.result == "failed"
        assert other.received == []


async def test_an_unreachable_push_service_is_retried(push, push_service):
    subscription = Subscription(push_service.endpoint("down"))
    device = web_device(push, subscription)
    push_service.server.shutdown()
    push_service.server.server_close()
    assert (await push.send("alice", device, message())).result == "retry"


async def test_a_push_service_that_does_not_answer_in_time_is_retried_not_waited_for(push_service):
    """NOTIFY_PUSH_TIMEOUT_SECONDS bounds one request: a push service holding it is left, to be tried again."""
    settings = web_push_settings(push_service, push_timeout_seconds=0.5)
    slow = Push(settings, broker=None, metrics=Metrics("test"))
    push_service.gate.clear()  # held unanswered until set (or 4 * TIMEOUT, then 503)
    try:
        outcome = await slow.send("alice", web_device(slow, Subscription(push_service.endpoint("held"))), message())
        assert outcome.result == "retry" and "no answer within 0.5 s" in outcome.reason
    finally:
        push_service.gate.set()
        await slow.aclose()


def test_a_payload_over_4096_bytes_encrypted_is_refused():
    subscription = Subscription("https://push.example.com/x")
    fits = message(body="b" * (MAX_ENCRYPTED_BYTES - encrypted_size(message(body="").payload())))
    assert len(encrypt(fits.payload(), subscription.p256dh, subscription.auth)) == MAX_ENCRYPTED_BYTES
    check_size(fits)
    over = message(body=fits.body + "b")
    with pytest.raises(PushTooLarge):
        check_size(over)
    with pytest.raises(PushTooLarge):
        encrypt(over.payload(), subscription.p256dh, subscription.auth)


async def test_at_most_64_kb_of_an_answer_is_read(push_service):
    push_service.status["/push/big"] = (413, {}, b"x" * (4 * 1024 * 1024))
    client = Client(1)
    answer = await guarded_post(client, push_service.endpoint("big"), [parse_origin(push_service.origin, "t")], {}, b"")
    await client.aclose()
    assert answer.status == 413 and len(answer.body) == MAX_ANSWER_BYTES


async def test_fcm_sends_the_v1_message_with_google_auths_token(push, google):
    device = push.device("android-1", "fcm", {"token": "dXk1:APA91b" + "Z" * 140})
    assert (await push.send("alice", device, message())).result == "sent"
    assert (await push.send("alice", device, message(url=None, body=None))).result == "sent"
    token_requests = [r for r in google.received if r.path == "/token"]
    sends = [r for r in google.received if r.path != "/token"]
    assert len(token_requests) == 1  # one token, reused until near its expiry
    assert [r.path for r in sends] == ["/v1/projects/proj-1/messages:send"] * 2
    assert all(r.headers["authorization"] == "Bearer ya29.test-0" for r in sends)
    assert orjson.loads(sends[0].body) == {
        "message": {
            "token": "dXk1:APA91b" + "Z" * 140,
            "notification": {"title": "Your order shipped", "body": "Arrives Tuesday"},
            "data": {
                "id": "1764079200000-1",
                "event": "order.shipped",
                "url": "https://shop.example.com/orders/7",
                "data": '{"order":7}',
            },
            "android": {"ttl": "3600s"},
            "webpush": {"fcm_options": {"link": "https://shop.example.com/orders/7"}},
        }
    }
    bare = orjson.loads(sends[1].body)["message"]
    assert "webpush" not in bare and "url" not in bare["data"] and "body" not in bare["notification"]


async def test_fcm_refreshes_a_token_near_its_expiry(push, google):
    google.expires_in = 60  # inside google-auth's refresh margin: every use refreshes it
    device = push.device("android-1", "fcm", {"token": "t" * 40})
    for _ in range(3):
        assert (await push.send("alice", device, message())).result == "sent"
    sends = [r for r in google.received if r.path != "/token"]
    assert google.issued == ["ya29.test-0", "ya29.test-1", "ya29.test-2"]
    assert [r.headers["authorization"] for r in sends] == [f"Bearer {t}" for t in google.issued]


@pytest.mark.parametrize(
    ("status", "error", "headers", "result"),
    [
        (404, {"status": "NOT_FOUND", "details": [{"errorCode": "UNREGISTERED"}]}, {}, "gone"),
        (400, {"status": "INVALID_ARGUMENT", "details": [{"errorCode": "UNREGISTERED"}]}, {}, "gone"),
        (404, {"status": "NOT_FOUND"}, {}, "gone"),
        (
            429,
            {"status": "RESOURCE_EXHAUSTED", "details": [{"errorCode": "QUOTA_EXCEEDED"}]},
            {"Retry-After": "9"},
            "retry",
        ),
        (503, {"status": "UNAVAILABLE"}, {}, "retry"),
        (400, {"status": "INVALID_ARGUMENT", "details": [{"errorCode": "INVALID_ARGUMENT"}]}, {}, "failed"),
    ],
)
async def test_fcm_answers_are_classified(push, google, status, error, headers, result):
    google.fcm_answer = (status, headers, orjson.dumps({"error": {"code": status, **error}}))
    outcome = await push.send("alice", push.device("a", "fcm", {"token": "t" * 40}), message())
    assert (outcome.result, outcome.status) == (result, status)
    if "Retry-After" in headers:
        assert outcome.retry_after == 9.0


async def test_fcm_gets_a_new_token_when_its_token_is_refused(push, google):
    device = push.device("android-1", "fcm", {"token": "t" * 40})
    assert (await push.send("alice", device, message())).result == "sent"
    google.issued.append("ya29.revoked-elsewhere")  # FCM now accepts only a token this service does not have
    refused = await push.send("alice", device, message())
    assert (refused.result, refused.status) == ("retry", 401)
    assert (await push.send("alice", device, message())).result == "sent"
    assert google.issued[-1] == "ya29.test-2"  # a new token was asked for after the refusal


async def _gone_removes_only_that_registration(push: Push, push_service: PushService, user: str) -> None:
    first = Subscription(push_service.endpoint(f"{user}-old"))
    push_service.status[f"/push/{user}-old"] = (410, {}, b"")
    old = web_device(push, first, "laptop")
    await push.register(user, old)
    await push.register(user, web_device(push, Subscription(push_service.endpoint("x")), "phone"))
    assert (await push.send(user, old, message())).result == "gone"
    assert [d.id for d in await push.devices.list(user)] == ["phone"]
    # The same id registered again (a new subscription) while a push to the old one was on its way.
    await push.register(user, old)
    renewed = web_device(push, Subscription(push_service.endpoint(f"{user}-new")), "laptop")
    await push.register(user, renewed)
    assert (await push.send(user, old, message())).result == "gone"
    devices = await push.devices.list(user)
    assert [d.id for d in devices] == ["phone", "laptop"] and devices[1] == renewed
    assert await push.devices.list("someone-else") == []


async def test_a_device_its_push_service_calls_gone_is_removed_unless_registered_again(push, push_service):
    await _gone_removes_only_that_registration(push, push_service, "gone-alice")


async def test_the_same_in_redis_beside_the_users_stream(push_service, redis_server):
    settings = web_push_settings(push_service, redis_url=redis_server.url, redis_prefix=f"t{uuid.uuid4().hex[:10]}")
    metrics = Metrics("test")
    broker = RedisBroker(settings, "test", metrics, Topics({}, 0).stream_rules)
    push = Push(settings, broker, metrics)
    try:
        await _gone_removes_only_that_registration(push, push_service, "gone-bob")
    finally:
        await push.aclose()
        await broker.stop()


async def test_a_kind_without_keys_is_refused(tmp_path):
    only_fcm = Push(Settings(jwt_secret=SECRET, fcm_credentials_file=_account(tmp_path)), None, Metrics("t"))
    only_web = Push(Settings(jwt_secret=SECRET, vapid_private_key=PEM, vapid_subject=SUBJECT), None, Metrics("t"))
    keys = Subscription("https://fcm.googleapis.com/x").to_json()["keys"]
    with pytest.raises(InvalidRequest, match="Web Push is not configured"):
        only_fcm.device("d", "webpush", {"endpoint": "https://fcm.googleapis.com/x", **keys})
    with pytest.raises(InvalidRequest, match="FCM is not configured"):
        only_web.device("d", "fcm", {"token": "t" * 40})
    await only_fcm.aclose()
    await only_web.aclose()


def _account(tmp_path: Path) -> str:
    service_account(tmp_path / "only.json", "http://127.0.0.1:9/token")
    return str(tmp_path / "only.json")
