"""Join and publish hooks against a real backend: a receiver on 127.0.0.1 that verifies every call
with the `standardwebhooks` package, two replicas sharing a real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook

from service.api.hooks import HookRefused, Hooks, HookUnavailable
from service.client import TopicRefused, listen
from service.config.settings import Settings
from service.telemetry.metrics import Metrics

from .pushkit import _Server
from .test_asyncapi import check_server_frame
from .test_browser import HARNESS, browser, page  # noqa: F401 - fixtures, used by name
from .test_client import running, take, until
from .test_topics import connect, frame_of, uid
from .utils import SECRET, TIMEOUT, Client, Replica, cluster_env, publisher_headers, refused_start, sse_events, token

HOOK_SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
HOOK_TIMEOUT = 3.0
PUB = publisher_headers()
INFO = {"role": "moderator", "colour": "teal"}


class Backend(_Server):
    """The backend's hook endpoints. Each call is verified as a receiver would verify it; what it
    answers depends on the user (joins: `ok-`, `no-`, `err-`, `hang-`) or the event (publishes:
    `plain`, `rewrite`, `deny`, `hang`). A hanging call waits until `release()` (bounded)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hanging = threading.Event()
        self._release = threading.Event()
        super().__init__(self._answer)

    def release(self) -> None:
        self._release.set()

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        payload = Webhook(HOOK_SECRET).verify(body, headers)  # raises (answered 400) on a bad signature
        assert headers["content-type"] == "application/json" and headers["webhook-id"]
        self.calls.append({"path": path, **payload})
        key = payload["user"] if path == "/join" else payload["event"]
        kind = key.split("-")[0]
        if kind == "hang":
            self.hanging.set()
            self._release.wait(4 * TIMEOUT)
            return 200, {}, b"{}"
        answers = {
            "ok": (200, {"info": INFO}),
            "plain": (200, {}),
            "rewrite": (200, {"data": {"text": "***", "checked": True}}),
            "no": (403, {"reason": "banned from this room"}),
            "deny": (403, {"reason": "no links"}),
            "err": (500, {"error": "boom"}),
        }
        if kind == "moved":
            return 307, {"Location": f"{self.origin}/publish"}, b""
        if kind == "huge":  # a 200 whose answer is over 64 KB: never read whole
            return 200, {}, json.dumps({"data": "x" * 100_000}).encode()
        status, reply = answers[kind]
        return status, {"Content-Type": "application/json"}, json.dumps(reply).encode()


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    server = Backend()
    with server.running():
        yield server
        server.release()


@pytest.fixture(scope="module")
def hooked(redis_server, backend) -> Iterator[tuple[Replica, Replica]]:
    namespaces = {
        # The token's claim first, then the hook.
        "gate": {"join": "token", "join_hook": f"{backend.origin}/join", "presence": True},
        # The hook alone decides.
        "club": {"join": "hook", "join_hook": f"{backend.origin}/join"},
        "mod": {"join": "any", "publish": True, "publish_hook": f"{backend.origin}/publish"},
    }
    env = cluster_env(
        redis_server,
        NOTIFY_TOPICS=json.dumps(namespaces),
        NOTIFY_HOOK_SECRET=HOOK_SECRET,
        NOTIFY_HOOK_TIMEOUT_SECONDS=str(HOOK_TIMEOUT),
        NOTIFY_MEMBER_PUBLISH_RATE="off",
    )
    a, b = Replica(env).start(), Replica(env).start()
    yield a, b
    a.stop()
    b.stop()


async def answer_to_join(client: Client, topic: str) -> dict[str, Any]:
    """The answer to a join: `joined` or its `error`."""
    await client.send({"type": "join", "topic": topic})
    async with asyncio.timeout(TIMEOUT + HOOK_TIMEOUT):
        while True:
            frame = await client.recv(TIMEOUT + HOOK_TIMEOUT)
            if frame["type"] in ("joined", "error") and frame.get("topic") == topic:
                check_server_frame(frame)  # as openapi/asyncapi.yaml describes it
                return frame


async def test_a_join_hook_decides_after_the_token(hooked, backend):
    a, _ = hooked
    topic = f"gate:{uid('room')}"
    user = uid("ok")
    allowed = await connect(a, user, topics=[topic], plan="pro")
    joined = await answer_to_join(allowed, topic)
    assert joined == {"type": "joined", "topic": topic, "cursor": joined["cursor"], "count": 1, "info": INFO}
    call = next(c for c in backend.calls if c["user"] == user)
    assert call["path"] == "/join" and call["topic"] == topic
    assert call["claims"]["sub"] == user and call["claims"]["plan"] == "pro" and call["claims"]["topics"] == [topic]

    refused = await connect(a, uid("no"), topics=[topic])
    assert await answer_to_join(refused, topic) == {
        "type": "error",
        "code": "forbidden",
        "message": "the backend's hook refused it: banned from this room",
        "topic": topic,
        "reason": "banned from this room",
    }
    failing = await connect(a, uid("err"), topics=[topic])
    error = await answer_to_join(failing, topic)
    assert (error["code"], error["message"]) == ("unavailable", "the hook answered 500")
    # The operator hears of it too (at most once a minute per hook), without the secret.
    await until(lambda: f"join hook {backend.origin}/join unavailable: the hook answered 500" in a.output())
    assert HOOK_SECRET not in a.output()

    # The token is asked first: without the claim the hook is never called.
    unclaimed = uid("ok")
    outsider = await connect(a, unclaimed)
    assert (await answer_to_join(outsider, topic))["code"] == "forbidden"
    assert not any(c["user"] == unclaimed for c in backend.calls)
    for client in (allowed, refused, failing, outsider):
        await client.close()


async def test_join_hook_alone_decides_where_join_is_hook(hooked, backend):
    _, b = hooked
    topic = f"club:{uid('c')}"
    member = await connect(b, uid("ok"))  # no topics claim at all
    joined = await answer_to_join(member, topic)
    assert joined["type"] == "joined" and joined["info"] == INFO
    stranger = await connect(b, uid("no"))
    refused = await answer_to_join(stranger, topic)
    assert (refused["code"], refused["reason"]) == ("forbidden", "banned from this room")
    await member.close()
    await stranger.close()


async def test_publish_hook_allows_rewrites_and_refuses(hooked, backend, http):
    a, b = hooked
    topic = f"mod:{uid('m')}"
    writer, reader = await connect(a, uid("w")), await connect(b, uid("r"))
    for client in (writer, reader):
        assert (await answer_to_join(client, topic))["type"] == "joined"

    await writer.send({"type": "publish", "topic": topic, "event": "plain", "data": {"text": "hello"}})
    await writer.send({"type": "publish", "topic": topic, "event": "rewrite", "data": {"text": "buy now"}})
    await writer.send({"type": "publish", "topic": topic, "event": "deny", "data": {"text": "http://x"}})
    await writer.send({"type": "publish", "topic": topic, "event": "plain", "data": {"text": "bye"}})
    refused = await frame_of(writer, "error")
    check_server_frame(refused)
    assert refused == {
        "type": "error",
        "code": "forbidden",
        "message": "the backend's hook refused it: no links",
        "topic": topic,
        "reason": "no links",
    }
    got = [(n["event"], n["data"]) for n in await reader.notifications(3)]
    assert got == [
        ("plain", {"text": "hello"}),
        ("rewrite", {"text": "***", "checked": True}),
        ("plain", {"text": "bye"}),
    ]
    for event, problem in (("moved", "the hook answered 307"), ("huge", "without a JSON object (at most 64 KB)")):
        await writer.send({"type": "publish", "topic": topic, "event": event, "data": 1})
        error = await frame_of(writer, "error")
        assert error["code"] == "unavailable" and problem in error["message"], error
    await reader.nothing()  # the refused messages reached no one
    calls = [c for c in backend.calls if c.get("topic") == topic and c["path"] == "/publish"]
    assert [(c["event"], c["data"]) for c in calls] == [
        ("plain", {"text": "hello"}),
        ("rewrite", {"text": "buy now"}),
        ("deny", {"text": "http://x"}),
        ("plain", {"text": "bye"}),
        ("moved", 1),
        ("huge", 1),
    ]
    assert all(c["user"] == calls[0]["user"] for c in calls)
    history = await http.get(f"{a.url}/topics/{quote(topic)}/history", headers=PUB)
    assert [m["event"] for m in history.json()["notifications"]] == ["plain", "rewrite", "plain"][::-1]
    await writer.close()
    await reader.close()


async def test_a_hook_that_does_not_answer_is_unavailable_and_slows_no_one_else(hooked, backend, http):
    """A join and a publish whose hook hangs: each is `unavailable` once NOTIFY_HOOK_TIMEOUT_SECONDS
    passed, nothing is published, and meanwhile another socket on the same replica gets its
    frames (and the waiting socket its notifications): they arrive while the hook still hangs."""
    a, _ = hooked
    backend.hanging.clear()
    gate, room = f"gate:{uid('h')}", f"mod:{uid('h')}"
    waiter_id, other_id = uid("hang"), uid("other")
    waiter, other = await connect(a, waiter_id, topics=[gate]), await connect(a, other_id)
    await waiter.send({"type": "join", "topic": gate})
    await asyncio.to_thread(backend.hanging.wait, TIMEOUT)
    assert backend.hanging.is_set()
    accepted = await http.post(f"{a.url}/notify/{other_id}", json={"event": "e", "data": 1}, headers=PUB)
    assert accepted.status_code == 202
    await other.send({"type": "ping"})
    assert (await other.notifications(1))[0]["data"] == 1
    assert (await frame_of(other, "pong"))["type"] == "pong"
    mine = await http.post(f"{a.url}/notify/{waiter_id}", json={"event": "mine", "data": 2}, headers=PUB)
    assert mine.status_code == 202
    # The waiting socket's own deliveries go on too; this one comes before the join's answer, so
    # all of the above came while the hook still hung.
    assert (await waiter.recv())["event"] == "mine"
    error = await waiter.recv(TIMEOUT + HOOK_TIMEOUT)
    assert (error["code"], error["topic"]) == ("unavailable", gate)
    assert error["message"] == f"the hook did not answer within {HOOK_TIMEOUT:g} s"

    assert (await answer_to_join(other, room))["type"] == "joined"
    backend.hanging.clear()
    await other.send({"type": "publish", "topic": room, "event": "hang-1", "data": "x"})
    error = await frame_of(other, "error", TIMEOUT + HOOK_TIMEOUT)
    assert (error["code"], error["topic"]) == ("unavailable", room)
    await other.nothing()  # nothing was published
    history = await http.get(f"{a.url}/topics/{quote(room)}/history", headers=PUB)
    assert history.json()["notifications"] == []
    await waiter.close()
    await other.close()


async def test_hook_calls_beyond_the_bound_are_unavailable_at_once(backend):
    """The hook client, in-process against the same real backend, bounded to one call in flight:
    while one call hangs another is `unavailable` without reaching the backend; once the hanging
    one timed out, calls go through again. Counted in notify_hook_calls_total."""
    settings = Settings(jwt_secret=SECRET, hook_secret=HOOK_SECRET, hook_timeout_seconds=1)
    metrics = Metrics("test")
    hooks = Hooks(settings, metrics, in_flight=1)
    url = f"{backend.origin}/join"
    try:
        backend.hanging.clear()
        hanging = asyncio.create_task(hooks.join(url, uid("hang"), "gate:x", {}))
        await asyncio.to_thread(backend.hanging.wait, TIMEOUT)
        turned_away = uid("ok")
        with pytest.raises(HookUnavailable, match="1 hook calls are already waiting"):
            await hooks.join(url, turned_away, "gate:x", {})
        assert not any(c["user"] == turned_away for c in backend.calls)
        with pytest.raises(HookUnavailable, match="did not answer within 1 s"):
            await hanging
        assert await hooks.join(url, uid("ok"), "gate:x", {"sub": "x"}) == INFO
        with pytest.raises(HookRefused) as refused:
            await hooks.join(url, uid("no"), "gate:x", {})
        assert refused.value.reason == "banned from this room"
    finally:
        await hooks.aclose()
    counted = {
        outcome: metrics.registry.get_sample_value("notify_hook_calls_total", {"hook": "join", "outcome": outcome})
        for outcome in ("allowed", "refused", "unavailable")
    }
    assert counted == {"allowed": 1, "refused": 1, "unavailable": 2}


async def test_sse_asks_the_join_hook_before_the_stream_starts(hooked, backend, http):
    _, b = hooked
    gate, club = f"gate:{uid('s')}", f"club:{uid('s')}"
    user = uid("ok")
    url = f"{b.url}/events?topics={gate},{club}"
    events = await sse_events(url, {"Authorization": f"Bearer {token(user, topics=[gate])}"}, 2, "joined")
    joined = {e["data"]["topic"]: e["data"] for e in events if e["data"]["type"] == "joined"}
    for frame in joined.values():
        check_server_frame(frame, "events")
    assert joined[gate]["info"] == INFO and joined[club]["info"] == INFO
    assert {(c["topic"], c["user"]) for c in backend.calls if c["user"] == user} == {(gate, user), (club, user)}

    refused = await http.get(f"{b.url}/events?topics={club}", headers={"Authorization": f"Bearer {token(uid('no'))}"})
    assert refused.status_code == 403
    assert refused.json() == {
        "error": "forbidden",
        "message": "the backend's hook refused it: banned from this room",
        "reason": "banned from this room",
    }
    failing = await http.get(f"{b.url}/events?topics={club}", headers={"Authorization": f"Bearer {token(uid('err'))}"})
    assert failing.status_code == 503
    assert failing.json() == {"error": "unavailable", "message": "the hook answered 500"}


async def test_the_python_client_shows_the_hooks_info(hooked):
    a, _ = hooked
    club = f"club:{uid('py')}"
    listener = listen(a.ws_url, token(uid("ok")), topics=[club])
    async with running(listener):
        await until(lambda: club in listener.joined)
        assert listener.topic_info == {club: INFO}
    with pytest.raises(TopicRefused) as refused:
        await take(listen(a.ws_url, token(uid("no")), topics=[club]), 1, within=TIMEOUT + HOOK_TIMEOUT)
    assert (refused.value.error, refused.value.reason) == ("forbidden", "banned from this room")


@pytest.mark.slow
async def test_the_browser_client_shows_the_hooks_info(hooked, page):  # noqa: F811 - the fixture
    """notify.js in a real Chromium: `join` resolves with the hook's `info` (kept as `topicInfo`),
    and a hook's refusal rejects with its `reason`."""
    a, _ = hooked
    club = f"club:{uid('js')}"
    await page.goto(f"{a.url}/healthz")
    await page.evaluate(HARNESS, [{"urls": [a.url], "token": token(uid("ok"))}, []])
    await page.wait_for_function("window.client.state === 'open'")
    joined = await page.evaluate("(topic) => window.client.join(topic)", club)
    assert joined["info"] == INFO
    assert await page.evaluate("(topic) => window.client.topicInfo(topic)", club) == INFO
    assert (await page.evaluate("window.seen.joined"))[0]["info"] == INFO
    refused = await page.evaluate(
        """async ([url, token, topic]) => {
            const { NotifyClient } = await import("/client/notify.js");
            const other = new NotifyClient({ urls: [url], token });
            other.connect();
            try { await other.join(topic); return null; }
            catch (error) { return { code: error.code, reason: error.reason }; }
            finally { other.close(); }
        }""",
        [a.url, token(uid("no")), club],
    )
    assert refused == {"code": "forbidden", "reason": "banned from this room"}


HOOK = {"c": {"join": "any", "join_hook": "http://127.0.0.1:9/join"}}
REFUSED = [
    ({"topics": HOOK}, "NOTIFY_HOOK_SECRET is required: the namespace 'c' names a hook"),
    ({"topics": {"c": {"publish_hook": "http://127.0.0.1:9/p"}}}, "NOTIFY_HOOK_SECRET is required"),
    ({"topics": HOOK, "hook_secret": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}, "it must start with 'whsec_'"),
    ({"topics": HOOK, "hook_secret": "whsec_not base64!"}, "after 'whsec_' must come base64"),
    ({"topics": HOOK, "hook_secret": "whsec_" + base64.b64encode(b"x" * 16).decode()}, "holds 16 bytes"),
    ({"topics": HOOK, "hook_secret": "whsec_" + base64.b64encode(b"x" * 65).decode()}, "holds 65 bytes"),
    ({"topics": {"c": {"join": "hook"}}, "hook_secret": HOOK_SECRET}, '"join": "hook" needs a "join_hook" URL'),
    ({"topics": {"c": {"join_hook": "ftp://127.0.0.1/j"}}, "hook_secret": HOOK_SECRET}, "URL scheme should be"),
    ({"topics": HOOK, "hook_secret": HOOK_SECRET, "hook_timeout_seconds": 0}, "greater than 0"),
]


@pytest.mark.parametrize(("values", "problem"), REFUSED, ids=[p for _, p in REFUSED])
def test_settings_refuse_hooks_that_cannot_work(values, problem):
    with pytest.raises(ValidationError) as refused:
        Settings(jwt_secret=SECRET, **values)
    assert problem in refused.value.errors()[0]["msg"]


def test_settings_read_the_hooks():
    settings = Settings(jwt_secret=SECRET, topics=HOOK, hook_secret=HOOK_SECRET)
    assert settings.hook_timeout_seconds == 2.0
    assert str(settings.topics["c"].join_hook) == "http://127.0.0.1:9/join"
    assert Settings(jwt_secret=SECRET).hook_secret is None  # no hook, no secret needed


def test_the_service_refuses_to_start_without_a_hook_secret():
    done = refused_start({"NOTIFY_TOPICS": json.dumps(HOOK)})
    assert done.returncode == 2
    assert done.stderr.strip() == "notify-service: NOTIFY_HOOK_SECRET is required: the namespace 'c' names a hook"
    short = base64.b64encode(b"shortkey").decode()
    bad = refused_start({"NOTIFY_TOPICS": json.dumps(HOOK), "NOTIFY_HOOK_SECRET": f"whsec_{short}"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "notify-service: NOTIFY_HOOK_SECRET holds 8 bytes; a Standard Webhooks secret is 24 to 64 bytes"
    )
    assert short not in bad.stderr  # a secret's text is never echoed
