"""The browser client and the demo page in a real headless Chromium, against real replicas and Redis.

Chromium is Debian's (`apt-get install chromium`), driven by Playwright from PyPI with
`executable_path`; Playwright's own browser download is never used."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from .utils import ROOT, TIMEOUT, RedisServer, Replica, cluster_env, publisher_headers, replicas, token

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("NOTIFY_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = TIMEOUT * 2000

# Replaces window.WebSocket with one that always fails to connect, as behind a proxy that breaks them.
BROKEN_WEBSOCKET = """
window.__wsAttempts = 0;
window.WebSocket = class {
  constructor(url) {
    window.__wsAttempts += 1;
    this.url = url;
    this.readyState = 0;
    setTimeout(() => {
      this.readyState = 3;
      this.onerror && this.onerror(new Event("error"));
      this.onclose && this.onclose({ code: 1006, reason: "" });
    }, 5);
  }
  send() { throw new Error("not open"); }
  close() {}
};
"""

# Loads the client into a blank page of the replica's origin; records what it emits.
HARNESS = """
async ([options, tokens]) => {
  const { NotifyClient } = await import("/client/notify.js");
  const Native = window.WebSocket;
  window.wsAttempts = 0;
  window.wsUrls = [];
  window.WebSocket = class extends Native {
    constructor(url) { super(url); window.wsAttempts += 1; window.wsUrls.push(url); }
  };
  window.tokens = tokens;
  const client = new NotifyClient({
    ...options,
    getToken: options.useGetToken ? async () => window.tokens.shift() : undefined,
  });
  window.client = client;
  window.seen = {
    state: [], welcome: [], close: [], refreshed: [], notification: [], error: [],
    message: [], joined: [], left: [], presence: [], signal: [],
  };
  for (const name of Object.keys(window.seen)) client.on(name, (payload) => window.seen[name].push(payload));
  client.connect();
}
"""


def _playwright() -> Any:
    try:
        from playwright import async_api
    except ImportError:
        pytest.fail(
            "playwright is not installed: `.venv/bin/pip install playwright` (`make install` does it); "
            "do not run `playwright install`: the tests use Debian's chromium",
            pytrace=False,
        )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set NOTIFY_CHROMIUM)",
            pytrace=False,
        )
    return async_api


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    api = _playwright()
    async with api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@contextlib.asynccontextmanager
async def _open_page(browser: Any) -> AsyncIterator[Any]:
    """A page in a browser context of its own (its own cookies and storage: another user)."""
    context = await browser.new_context(viewport={"width": 1200, "height": 800})
    try:
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.set_default_timeout(WAIT_MS)
        yield page
    finally:
        await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    async with _open_page(browser) as opened:
        yield opened


@pytest.fixture
def demo_pair(redis_server: RedisServer) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas sharing one Redis, with the demo on; a test may kill either."""
    env = cluster_env(redis_server, NOTIFY_DEMO="true", NOTIFY_DRAIN_SECONDS="0.5")
    a = Replica(env).start()
    try:
        b = Replica(env).start()
    except BaseException:
        a.stop()
        raise
    yield a, b
    for replica in (a, b):
        if replica.proc is not None:
            replica.proc.send_signal(signal.SIGCONT)
        replica.stop()


@pytest.fixture(scope="module")
def demo_single(redis_server: RedisServer) -> Iterator[Replica]:
    replica = Replica(cluster_env(redis_server, NOTIFY_DEMO="true", NOTIFY_DRAIN_SECONDS="0.5")).start()
    yield replica
    replica.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def _user() -> str:
    return f"browser-{uuid.uuid4().hex[:10]}"


async def _publish(http: httpx.AsyncClient, replica: Replica, user: str, n: int) -> str:
    body = {"event": "order.shipped", "data": {"n": n}}
    response = await http.post(f"{replica.url}/notify/{user}", json=body, headers=publisher_headers())
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def _shown(page: Any) -> list[str]:
    """Ids of the notifications in the page's list, newest first."""
    items = page.get_by_test_id("notification")
    return await items.evaluate_all("items => items.map(i => i.dataset.id)")


async def test_demo_page_survives_its_replica_dying(demo_pair, page, http):
    """The page sees a notification, loses its replica, reconnects elsewhere, gets exactly what it missed."""
    expect = _playwright().expect
    a, b = demo_pair
    user = _user()
    await page.goto(f"{a.url}/demo?user={user}&servers={a.url},{b.url}")
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "open")
    await expect(page.get_by_test_id("user")).to_have_text(user)

    first = await _publish(http, b, user, 1)
    await expect(page.locator(f'[data-testid="notification"][data-id="{first}"]')).to_be_visible()
    await expect(page.get_by_test_id("unread")).to_have_text("1")

    on = await page.get_by_test_id("server").get_attribute("data-url")
    victim, survivor = (a, b) if on == a.url else (b, a)
    assert on == victim.url, on
    # Freeze the page's replica so it cannot deliver what follows, then kill it: the only way for the
    # page to get these is to resume from its cursor on the other replica.
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGSTOP)
    missed = [await _publish(http, survivor, user, n) for n in (2, 3, 4)]
    victim.proc.kill()
    victim.proc.wait(TIMEOUT)

    for id_ in missed:
        await expect(page.locator(f'[data-testid="notification"][data-id="{id_}"]')).to_be_visible()
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "open")
    await expect(page.get_by_test_id("server")).to_have_attribute("data-url", survivor.url)
    welcomes = await page.evaluate("window.notifyDemo.welcomes")
    assert [w["url"] for w in welcomes] == [victim.url, survivor.url], welcomes
    assert welcomes[-1]["recovered"] is True, welcomes[-1]

    live = await _publish(http, survivor, user, 5)
    await expect(page.locator(f'[data-testid="notification"][data-id="{live}"]')).to_be_visible()
    expected = [first, *missed, live]
    assert await page.evaluate("window.notifyDemo.shown") == expected  # each once, in order
    assert await _shown(page) == expected[::-1]
    await expect(page.get_by_test_id("unread")).to_have_text("5")

    # Mark all read: the ack goes over the socket and the server answers with the new count.
    await page.get_by_test_id("mark-read").click()
    await expect(page.get_by_test_id("unread")).to_have_text("0")
    await expect(page.get_by_test_id("mark-read")).to_be_disabled()
    inbox = await http.get(f"{survivor.url}/users/{user}/notifications", headers=publisher_headers())
    assert inbox.status_code == 200, inbox.text
    assert inbox.json()["unread"] == 0
    assert [n["id"] for n in inbox.json()["notifications"]] == expected[::-1]


async def test_demo_page_publish_form(demo_single, page):
    """The page's form publishes through the REST API and the notification comes back over the socket."""
    expect = _playwright().expect
    user = _user()
    await page.goto(f"{demo_single.url}/demo?user={user}")
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "open")
    await page.get_by_test_id("publish-event").fill("demo.form")
    await page.get_by_test_id("publish-data").fill('{"text": "hi"}')
    await page.get_by_test_id("publish-submit").click()
    await expect(page.get_by_test_id("publish-result")).to_contain_text("Published")
    published = await page.get_by_test_id("publish-result").get_attribute("data-id")
    item = page.locator(f'[data-testid="notification"][data-id="{published}"]')
    await expect(item).to_have_attribute("data-event", "demo.form")
    await expect(item).to_contain_text('{"text":"hi"}')
    # No VAPID key on this service: no push button, and the notification says push is off here.
    await expect(item.get_by_test_id("push-state")).to_have_attribute("data-push", "off")
    await expect(page.get_by_test_id("push-toggle")).to_be_hidden()


async def test_falls_back_to_sse_when_websockets_fail(demo_single, page, http):
    """With WebSockets broken, the client switches to SSE after a few failures, then delivers and acks."""
    expect = _playwright().expect
    user = _user()
    await page.add_init_script(BROKEN_WEBSOCKET)
    await page.goto(f"{demo_single.url}/demo?user={user}")
    await expect(page.get_by_test_id("state")).to_have_attribute("data-state", "open", timeout=WAIT_MS * 2)
    await expect(page.get_by_test_id("transport")).to_have_attribute("data-transport", "sse")
    assert await page.evaluate("window.__wsAttempts") == 3

    ids = [await _publish(http, demo_single, user, n) for n in (1, 2)]
    for id_ in ids:
        await expect(page.locator(f'[data-testid="notification"][data-id="{id_}"]')).to_be_visible()
    await expect(page.get_by_test_id("unread")).to_have_text("2")
    # No socket to ack on: the client posts to /me/notifications/read instead.
    await page.get_by_test_id("mark-read").click()
    await expect(page.get_by_test_id("unread")).to_have_text("0")
    assert await page.evaluate("window.notifyDemo.shown") == ids


async def test_stops_on_4401_until_a_new_token(demo_single, page):
    """A refused token is not retried, neither as given nor when getToken hands back the same one."""
    user = _user()
    bad = token(user, key="another-secret-" + "y" * 24)
    await page.goto(f"{demo_single.url}/healthz")
    await page.evaluate(HARNESS, [{"token": bad, "useGetToken": True, "minDelay": 20}, [bad, bad]])
    await page.wait_for_function("window.client.state === 'unauthorized'")
    await asyncio.sleep(0.5)
    assert await page.evaluate("window.wsAttempts") == 1
    assert await page.evaluate("window.seen.close.map(c => c.code)") == [4401]

    await page.evaluate("t => window.client.setToken(t)", token(user))
    await page.wait_for_function("window.client.state === 'open'")
    assert await page.evaluate("window.wsAttempts") == 2


async def test_refreshes_token_before_exp(demo_single, page):
    """A token about to expire is replaced on the live socket; the socket outlives the first token."""
    user = _user()
    await page.goto(f"{demo_single.url}/healthz")
    options = {"token": token(user, ttl=3), "useGetToken": True, "refreshMargin": 2}
    await page.evaluate(HARNESS, [options, [token(user, ttl=600)]])
    await page.wait_for_function("window.seen.refreshed.length === 1")
    await asyncio.sleep(3.5)  # past the first token's exp
    assert await page.evaluate("window.client.state") == "open"
    assert await page.evaluate("window.seen.close") == []
    assert await page.evaluate("window.wsAttempts") == 1


async def test_ping_detects_a_frozen_replica(demo_pair, page, http):
    """A replica that stops answering (no close, no RST) is caught by app-level pings; the client moves on."""
    a, b = demo_pair
    user = _user()
    await page.goto(f"{a.url}/healthz")
    options = {"urls": [a.url, b.url], "token": token(user), "pingInterval": 300, "pongTimeout": 700}
    await page.evaluate(HARNESS, [options, []])
    await page.wait_for_function("window.client.state === 'open'")
    first = await _publish(http, b, user, 1)
    await page.wait_for_function("window.seen.notification.length === 1")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        missed = await _publish(http, b, user, 2)
        await page.wait_for_function("window.seen.welcome.length === 2")
        await page.wait_for_function("window.seen.notification.length === 2")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert await page.evaluate("window.seen.welcome.map(w => w.url)") == [a.url, b.url]
    assert await page.evaluate("window.seen.notification.map(n => n.id)") == [first, missed]
    assert await page.evaluate("window.seen.close.map(c => c.reason)") == ["no answer to ping"]


# ---- topics, per-stream cursors and 4403

NAMESPACES = {"chat": {"join": "any", "publish": True, "signals": True, "presence": True, "join_leave": True}}
ADMIN = {"Authorization": f"Bearer {token('moderator', 'notify:admin')}"}


@pytest.fixture
def topic_pair(redis_server: RedisServer) -> Iterator[tuple[Replica, Replica]]:
    """Two replicas sharing one Redis, with a topic namespace; a test may freeze either."""
    env = cluster_env(redis_server, NOTIFY_TOPICS=json.dumps(NAMESPACES), NOTIFY_DRAIN_SECONDS="0.5")
    a = Replica(env).start()
    try:
        b = Replica(env).start()
    except BaseException:
        a.stop()
        raise
    yield a, b
    for replica in (a, b):
        if replica.proc is not None:
            replica.proc.send_signal(signal.SIGCONT)
        replica.stop()


async def _post(
    http: httpx.AsyncClient, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    response = await http.post(url, json=body, headers=headers or publisher_headers())
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_topics_resume_per_stream_across_replicas(topic_pair, page, http):
    """Join, publish, presence and signals from the browser; then the replica freezes while a backend
    publishes to the user, to everyone and to the topic: the client moves on and resumes each stream
    from its own cursor (the topic by joining again with since), getting everything once, in order."""
    a, b = topic_pair
    user, lobby = _user(), f"chat:{uuid.uuid4().hex[:8]}"
    await page.goto(f"{a.url}/healthz")
    options = {"urls": [a.url, b.url], "token": token(user), "pingInterval": 300, "pongTimeout": 700}
    await page.evaluate(HARNESS, [options, []])
    await page.wait_for_function("window.client.state === 'open'")
    welcome = (await page.evaluate("window.seen.welcome"))[0]
    cursors = await page.evaluate("[window.client.lastUserId, window.client.lastBroadcastId]")
    assert cursors == [welcome["cursor"], welcome["broadcast_cursor"]]

    joined = await page.evaluate("t => window.client.join(t)", lobby)
    assert joined["type"] == "joined" and joined["topic"] == lobby and joined["count"] == 1
    assert await page.evaluate("t => window.client.lastTopicId(t)", lobby) == joined["cursor"]
    own = await page.evaluate("t => window.client.publish(t, 'msg', {n: 0})", lobby)
    assert own["type"] == "published" and own["topic"] == lobby
    refused = await page.evaluate(
        """async (t) => {
             try { await window.client.publish(t, "msg", 1); return null; }
             catch (e) { return { name: e.name, code: e.code, topic: e.topic }; }
           }""",
        "chat:elsewhere",
    )
    assert refused == {"name": "NotifyError", "code": "forbidden", "topic": "chat:elsewhere"}

    # A second user in the same page: presence, and a signal from the first one.
    bob = _user()
    await page.evaluate(
        """async ([t, token]) => {
             const { NotifyClient } = await import("/client/notify.js");
             window.bob = new NotifyClient({ url: location.origin, token });
             window.bobSignals = [];
             window.bob.on("signal", (s) => window.bobSignals.push(s));
             window.bob.connect();
             await window.bob.join(t);
           }""",
        [lobby, token(bob)],
    )
    await page.wait_for_function("window.seen.presence.some(p => p.joined.length > 0 && p.count === 2)")
    members = await page.evaluate("t => window.client.presence(t)", lobby)
    assert members["count"] == 2 and members["users"] == sorted([user, bob])
    assert await page.evaluate("t => window.client.signal(t, 'typing', true)", lobby) is True
    await page.wait_for_function("window.bobSignals.length === 1")
    assert (await page.evaluate("window.bobSignals[0]"))["from"] == user
    await page.evaluate("t => window.bob.leave(t).then(() => window.bob.close())", lobby)

    sent: dict[str, list[str]] = {"user": [], "broadcast": [], "topic": [own["id"]]}

    async def publish_round(n: int) -> None:
        sent["user"].append(await _publish(http, b, user, n))
        sent["broadcast"].append((await _post(http, f"{b.url}/broadcast", {"event": "b", "data": n}))["id"])
        sent["topic"].append((await _post(http, f"{b.url}/topics/{lobby}", {"event": "m", "data": n}))["id"])

    await publish_round(1)
    await page.wait_for_function("window.seen.message.length === 2 && window.seen.notification.length === 2")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGSTOP)
    try:
        for n in (2, 3):
            await publish_round(n)
        await page.wait_for_function("window.seen.welcome.length === 2")
        await page.wait_for_function("window.seen.message.length === 4 && window.seen.notification.length === 6")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    await publish_round(4)
    await page.wait_for_function("window.seen.message.length === 5 && window.seen.notification.length === 8")
    await asyncio.sleep(0.3)

    assert await page.evaluate("window.seen.welcome.map(w => w.url)") == [a.url, b.url]
    rejoined = (await page.evaluate("window.seen.joined"))[-1]
    assert rejoined["topic"] == lobby and rejoined["recovered"] is True
    assert await page.evaluate("window.seen.message.map(m => m.id)") == sent["topic"]
    notifications = await page.evaluate("window.seen.notification")
    assert [n["id"] for n in notifications if not n.get("broadcast")] == sent["user"]
    assert [n["id"] for n in notifications if n.get("broadcast")] == sent["broadcast"]
    assert await page.evaluate("t => window.client.lastTopicId(t)", lobby) == sent["topic"][-1]
    # The second socket resumed each stream from its own cursor.
    query = parse_qs(urlsplit(await page.evaluate("window.wsUrls.at(-1)")).query)  # [alice, bob, alice again]
    assert await page.evaluate("window.wsUrls.length") == 3
    assert (query["since"], query["broadcast_since"]) == ([sent["user"][0]], [sent["broadcast"][0]])


async def test_stops_on_4403_without_asking_for_a_token(demo_single, page, http):
    """Disconnected by the server: the client stops, does not call getToken by itself, and starts
    again only when the application gives it a token."""
    user = _user()
    first = token(user)
    await page.goto(f"{demo_single.url}/healthz")
    await page.evaluate(HARNESS, [{"token": first, "useGetToken": True, "minDelay": 20}, [token(user, ttl=900)]])
    await page.wait_for_function("window.client.state === 'open'")
    await _post(http, f"{demo_single.url}/users/{user}/disconnect", headers=ADMIN)
    await page.wait_for_function("window.client.state === 'unauthorized'")
    await asyncio.sleep(0.5)
    assert await page.evaluate("window.seen.close.map(c => c.code)") == [4403]
    assert await page.evaluate("window.seen.state.at(-1)") == {
        "state": "unauthorized",
        "transport": "websocket",
        "url": demo_single.url,
        "attempt": 0,
        "code": 4403,
    }
    assert await page.evaluate("[window.wsAttempts, window.tokens.length]") == [1, 1]

    # The same token again is refused without a connection; a new one (another exp) starts it again.
    await page.evaluate("t => window.client.setToken(t)", first)
    await asyncio.sleep(0.3)
    assert await page.evaluate("[window.client.state, window.wsAttempts]") == ["unauthorized", 1]
    await page.evaluate("t => window.client.setToken(t)", token(user, ttl=1800))
    await page.wait_for_function("window.client.state === 'open'")
    assert await page.evaluate("window.wsAttempts") == 2


# ---- the demo page's chat room


def _demo_topics() -> dict[str, Any]:
    """The namespaces `make run` configures (the Makefile's DEMO_TOPICS), so that the test follows them."""
    found = re.search(r"^DEMO_TOPICS\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, "no DEMO_TOPICS in the Makefile"
    topics: dict[str, Any] = json.loads(found.group(1))
    return topics


@pytest.fixture
def chat_pair(redis_server: RedisServer) -> Iterator[tuple[Replica, ...]]:
    """Two replicas sharing one Redis, configured like `make run`; a leave is told after half a second."""
    env = cluster_env(
        redis_server,
        NOTIFY_DEMO="true",
        NOTIFY_TOPICS=json.dumps(_demo_topics()),
        NOTIFY_PRESENCE_LEAVE_GRACE_SECONDS="0.5",
        NOTIFY_DRAIN_SECONDS="0.5",
    )
    with replicas(2, env) as pair:
        yield pair


async def _members(page: Any) -> list[str]:
    return await page.get_by_test_id("chat-member").evaluate_all("items => items.map(i => i.dataset.user)")


async def test_demo_chat_room(chat_pair, browser, page, tmp_path):
    """Alice and Bob, each in a browser of their own on a replica of their own, chat in the demo
    page's room: members and count, a message shown once on both pages, Bob's typing shown to Alice
    only, and Bob's leave taking him off Alice's member list."""
    expect = _playwright().expect
    a, b = chat_pair
    alice = page
    async with _open_page(browser) as bob:
        await alice.goto(f"{a.url}/demo?user=alice&servers={a.url}")
        await bob.goto(f"{b.url}/demo?user=bob&servers={b.url}")
        for each in (alice, bob):
            await expect(each.get_by_test_id("state")).to_have_attribute("data-state", "open")
            await expect(each.get_by_test_id("chat-room")).to_have_value("chat:lobby")
            await expect(each.get_by_test_id("chat-input")).to_be_disabled()

        await alice.get_by_test_id("chat-join").click()
        await expect(alice.get_by_test_id("chat-status")).to_have_text("in chat:lobby")
        await expect(alice.get_by_test_id("chat-count")).to_have_text("1")
        await bob.get_by_test_id("chat-join").click()
        await expect(bob.get_by_test_id("chat-status")).to_have_text("in chat:lobby")
        for each in (alice, bob):
            await expect(each.get_by_test_id("chat-count")).to_have_text("2")
            await expect(each.get_by_test_id("chat-member")).to_have_count(2)
            assert await _members(each) == ["alice", "bob"]
        await expect(alice.get_by_test_id("chat-event").filter(has_text="bob joined")).to_have_count(1)

        # A message from Alice reaches both pages once, from alice (the server sets `from`).
        await alice.get_by_test_id("chat-input").fill("Hello from Alice <b>not bold</b>")
        await alice.get_by_test_id("chat-send").click()
        for each in (alice, bob):
            message = each.get_by_test_id("chat-message")
            await expect(message).to_have_count(1)
            await expect(message).to_have_attribute("data-from", "alice")
            await expect(message.locator(".from")).to_have_text("alice")
            await expect(message.locator(".text")).to_have_text("Hello from Alice <b>not bold</b>")
            assert await message.locator("b").count() == 0  # text, never HTML
        await expect(alice.get_by_test_id("chat-input")).to_have_value("")

        # Bob types: Alice sees it, Bob's own page does not; one signal however fast he types.
        started = time.monotonic()
        await bob.get_by_test_id("chat-input").press_sequentially("Hi Alice, nice demo")
        elapsed = time.monotonic() - started
        typing = alice.get_by_test_id("chat-typing")
        await expect(typing).to_have_text("bob is typing…")
        sent = await bob.evaluate("window.notifyDemo.chat.typingSent")
        assert 1 <= sent <= 1 + int(elapsed / 2), (sent, elapsed)
        await expect(bob.get_by_test_id("chat-typing")).not_to_contain_text("bob")
        assert await bob.evaluate("window.notifyDemo.chat.signals.filter(s => s.from === 'bob').length") == 0
        await expect(typing).to_be_empty(timeout=WAIT_MS)  # about 3 s after his last signal

        # Bob leaves: once the leave grace is over, Alice's list is down to herself.
        await bob.get_by_test_id("chat-leave").click()
        await expect(bob.get_by_test_id("chat-status")).to_have_text("not joined")
        await expect(bob.get_by_test_id("chat-member")).to_have_count(0)
        await expect(bob.get_by_test_id("chat-send")).to_be_disabled()
        await expect(alice.get_by_test_id("chat-count")).to_have_text("1", timeout=WAIT_MS)
        assert await _members(alice) == ["alice"]
        await expect(alice.get_by_test_id("chat-event").filter(has_text="bob left")).to_have_count(1)
        await expect(alice.get_by_test_id("chat-message")).to_have_count(1)
        await alice.screenshot(path=tmp_path / "chat-alice.png", full_page=True)
