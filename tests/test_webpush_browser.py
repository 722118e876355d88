"""Web Push end to end in a real browser: Debian's firefox-esr, its push service pointed at a local
one (tests/mozpush.py) that checks VAPID as a real one does. A page enables push through notify.js;
the device is registered; the service's own sender pushes to it; the service worker decrypts it,
shows the notification and tells the page; a `read` push closes it; a click on it opens its url or
focuses the tab already there."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from service.config.settings import Settings
from service.push import Push, PushMessage
from service.telemetry.metrics import Metrics

from .firefox import Firefox, firefox_binary
from .mozpush import MozPush
from .pushkit import public_of, vapid_pem
from .utils import SECRET, TIMEOUT, publisher_headers, running, token

pytestmark = pytest.mark.slow

PEM = vapid_pem()
SUBJECT = "mailto:ops@example.com"
USER = "ff-alice"
ADMIN = {"Authorization": f"Bearer {token('ops', 'notify:admin')}"}


@pytest.fixture(scope="module")
def mozpush() -> Iterator[MozPush]:
    with MozPush().running() as service:
        yield service


@pytest.fixture(scope="module")
def replica(mozpush: MozPush) -> Iterator[object]:
    env = {
        "NOTIFY_VAPID_PRIVATE_KEY": PEM,
        "NOTIFY_VAPID_SUBJECT": SUBJECT,
        "NOTIFY_PUSH_ALLOWED_ORIGINS": mozpush.origin,
        "NOTIFY_DEMO": "true",
    }
    with running(env) as replica:
        yield replica


@pytest.fixture(scope="module")
def firefox(mozpush: MozPush, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Firefox]:
    if firefox_binary() is None:
        pytest.fail("no firefox-esr: `make system-deps` (or `apt-get install -y firefox-esr`)", pytrace=False)
    prefs = {
        "dom.push.serverURL": mozpush.ws_url,
        "dom.push.testing.allowInsecureServerURL": True,
        "dom.push.connection.enabled": True,
        "dom.push.enabled": True,
        "dom.push.testing.ignorePermission": True,
        "dom.serviceWorkers.enabled": True,
        "dom.serviceWorkers.testing.enabled": True,
        "permissions.default.desktop-notification": 1,  # granted: no prompt to answer headless
        "dom.webnotifications.enabled": True,
        "alerts.useSystemBackend": False,  # Firefox's own notification windows: what click_notification clicks
        "browser.shell.checkDefaultBrowser": False,
        "browser.startup.homepage_override.mstone": "ignore",
        "datareporting.policy.dataSubmissionEnabled": False,
        "toolkit.telemetry.reportingpolicy.firstRun": False,
        "app.update.disabledForTesting": True,
        "remote.active-protocols": 1,
    }
    profile = tmp_path_factory.mktemp("firefox-profile")
    with Firefox(profile, prefs, system_access=True).running() as browser:  # to click notifications
        yield browser


class ReadPush(PushMessage):
    """The small push that says the user read up to `id` (docs/protocol.md, "Push")."""

    def payload(self) -> bytes:
        return json.dumps({"type": "read", "up_to": self.id}).encode()


def service_sender(mozpush: MozPush) -> Push:
    """The service's own push machinery, with the replica's VAPID key (what the replica would send)."""
    settings = Settings(
        jwt_secret=SECRET, vapid_private_key=PEM, vapid_subject=SUBJECT, push_allowed_origins=mozpush.origin
    )
    return Push(settings, broker=None, metrics=Metrics("test"))


def send(replica_push: Push, device_id: str, subscription: dict, message: PushMessage) -> str:
    async def go() -> str:
        fields = {"endpoint": subscription["endpoint"], **subscription["keys"]}
        outcome = await replica_push.send(USER, replica_push.device(device_id, "webpush", fields), message)
        return f"{outcome.result} {outcome.status}"

    return asyncio.run(go())


# The page: notify.js imported, the worker's messages collected in window.swMessages.
def setup(user: str) -> str:
    return f"""(async () => {{
  window.swMessages = [];
  navigator.serviceWorker.addEventListener("message", (e) => window.swMessages.push(e.data));
  const {{ NotifyClient }} = await import("/client/notify.js");
  window.client = new NotifyClient({{ url: location.origin, token: {json.dumps(token(user))} }});
  return true;
}})()"""


SETUP = setup(USER)


REGISTRATION = 'navigator.serviceWorker.getRegistration("/client/")'
SUBSCRIPTION = f"{REGISTRATION}.then((r) => r.pushManager.getSubscription()).then((s) => s.toJSON())"


def poll(browser: Firefox, expression: str, until: object, context: str | None = None) -> object:
    """Evaluates `expression` in the page (or `context`) until it equals `until` (bounded); the last value."""
    value = None
    for _ in range(int(60 * TIMEOUT)):
        value = browser.evaluate(expression, context)
        if value == until:
            return value
        browser.evaluate("new Promise((r) => setTimeout(r, 200))", context)
    return value


def wait_for_new_tab(browser: Firefox, before: dict[str, str]) -> str | None:
    """The first tab that was not among `before` and has left about:blank (bounded wait)."""
    deadline = time.monotonic() + 6 * TIMEOUT
    while time.monotonic() < deadline:
        for context, url in browser.tabs().items():
            if context not in before and url != "about:blank":
                return context
        time.sleep(0.1)
    return None


def test_a_page_enables_push_and_the_worker_shows_then_closes_what_the_service_pushes(replica, mozpush, firefox):
    firefox.goto(f"{replica.url}/demo")
    assert firefox.evaluate(SETUP) is True

    enabled = firefox.evaluate('client.enablePush({serviceWorker: "/client/notify-sw.js"})')
    assert enabled["endpoint"].startswith(f"{mozpush.origin}/wpush/")
    assert firefox.evaluate('localStorage.getItem("notify.deviceId")') == enabled["deviceId"]

    devices = httpx.get(f"{replica.url}/users/{USER}/devices", headers=ADMIN, timeout=10).json()["devices"]
    assert [(d["id"], d["kind"], d["origin"]) for d in devices] == [(enabled["deviceId"], "webpush", mozpush.origin)]

    subscription = firefox.evaluate(SUBSCRIPTION)
    sender = service_sender(mozpush)
    shipped = PushMessage(
        id="1795615904511-2",
        event="order.shipped",
        title="Your order shipped",
        ts=1795615904511,
        ttl=3600,
        body="Arrives Tuesday",
        url=f"{replica.url}/demo#orders/7",
        tag="order-7",
        data={"order": 7},
    )
    later = PushMessage(id="1795615904600-1", event="order.delivered", title="Delivered", ts=1795615904600, ttl=3600)
    assert send(sender, enabled["deviceId"], subscription, shipped) == "sent 201"
    assert send(sender, enabled["deviceId"], subscription, later) == "sent 201"
    assert mozpush.refused == []

    shown = f"""{REGISTRATION}.then((r) => r.getNotifications())
      .then((ns) => ns.map((n) => ({{title: n.title, body: n.body, tag: n.tag, data: n.data}})))"""
    notifications = poll(firefox, f"{shown}.then((ns) => ns.length)", 2)
    assert notifications == 2, firefox.log[-30:]
    by_title = {n["title"]: n for n in firefox.evaluate(shown)}
    assert by_title["Your order shipped"] == {
        "title": "Your order shipped",
        "body": "Arrives Tuesday",
        "tag": "order-7",
        "data": {
            "id": "1795615904511-2",
            "event": "order.shipped",
            "url": f"{replica.url}/demo#orders/7",
            "data": {"order": 7},
            "ts": 1795615904511,
        },
    }
    assert by_title["Delivered"]["data"]["id"] == "1795615904600-1"
    told = firefox.evaluate('swMessages.filter((m) => m.type === "push").map((m) => m.notification.id)')
    assert sorted(told) == ["1795615904511-2", "1795615904600-1"]

    # Read up to the first on another device: the service pushes `read`, and only the first closes.
    read = ReadPush(id="1795615904511-2", event="", title="", ts=0, ttl=3600)
    assert send(sender, enabled["deviceId"], subscription, read) == "sent 201"
    # (What the worker closed, as it tells the page: headless Firefox drops every shown notification
    # 20 s after showing it, so a late look at getNotifications() could not tell a close from that.)
    closed = 'swMessages.filter((m) => m.type === "read").map((m) => m.closed)'
    assert poll(firefox, f"{closed}.length", 1) == 1
    assert firefox.evaluate(closed) == [["1795615904511-2"]]
    assert "1795615904511-2" not in firefox.evaluate(f"{shown}.then((ns) => ns.map((n) => n.data.id))")
    asyncio.run(sender.aclose())

    # Disabled: the subscription and the device are gone.
    firefox.evaluate("client.disablePush({scope: '/client/'})")
    devices = httpx.get(f"{replica.url}/users/{USER}/devices", headers=ADMIN, timeout=10).json()["devices"]
    assert devices == []
    assert firefox.evaluate('localStorage.getItem("notify.deviceId")') is None


def test_a_click_on_a_notification_opens_its_url_or_focuses_the_tab_already_there(replica, mozpush, firefox):
    """A user's click on a shown notification (Firefox's own notification window, clicked) reaches the
    worker's `notificationclick`: the page is told, the notification closes and its url opens in a
    new tab. Clicked on a later one whose url a tab already shows, that tab gets the focus and none
    opens. (Headless Firefox focuses the tab's document, `document.hasFocus()`, without bringing the
    tab to the front: its visibilityState stays hidden, so focus is what is checked.)"""
    user = "ff-click"
    firefox.goto(f"{replica.url}/demo")
    assert firefox.evaluate(setup(user)) is True
    enabled = firefox.evaluate('client.enablePush({serviceWorker: "/client/notify-sw.js"})')
    subscription = firefox.evaluate(SUBSCRIPTION)
    sender = service_sender(mozpush)
    url = f"{replica.url}/demo#orders/9"
    shipped = PushMessage(
        id="1795615906000-1", event="order.shipped", title="Order 9 shipped", ts=1795615906000, ttl=3600, url=url
    )
    clicks = 'swMessages.filter((m) => m.type === "click")'
    shown = f"{REGISTRATION}.then((r) => r.getNotifications()).then((ns) => ns.map((n) => n.data.id))"
    # What is still shown the moment the page hears of a click. Firefox drops a clicked notification
    # itself too, once its window has faded out (0.6 s): only a look this early tells that the worker
    # closed it.
    assert firefox.evaluate(f"""(window.shownAtClick = [], navigator.serviceWorker.addEventListener("message",
      async (e) => {{ if (e.data.type === "click") shownAtClick.push(await {shown}); }}), true)""")
    focused = "document.hasFocus()"
    before = firefox.tabs()

    assert send(sender, enabled["deviceId"], subscription, shipped) == "sent 201"
    firefox.click_notification("Order 9 shipped")
    assert poll(firefox, f"{clicks}.length", 1) == 1, firefox.log[-30:]
    assert firefox.evaluate(clicks) == [{"source": "notify-sw", "type": "click", "id": shipped.id, "url": url}]
    assert poll(firefox, "shownAtClick.length", 1) == 1
    assert shipped.id not in firefox.evaluate("shownAtClick[0]")
    opened = wait_for_new_tab(firefox, before)
    assert opened is not None, firefox.tabs()
    assert firefox.tabs() == {**before, opened: url}

    # The next one's url is already open in a tab, behind the page: a click focuses that tab.
    firefox.activate(firefox.page)
    assert poll(firefox, focused, False, context=opened) is False
    delivered = PushMessage(
        id="1795615906100-1", event="order.delivered", title="Order 9 delivered", ts=1795615906100, ttl=3600, url=url
    )
    assert send(sender, enabled["deviceId"], subscription, delivered) == "sent 201"
    firefox.click_notification("Order 9 delivered")
    assert poll(firefox, f"{clicks}.length", 2) == 2, firefox.log[-30:]
    assert firefox.evaluate(clicks)[1] == {"source": "notify-sw", "type": "click", "id": delivered.id, "url": url}
    assert poll(firefox, focused, True, context=opened) is True
    assert firefox.tabs() == {**before, opened: url}
    assert poll(firefox, "shownAtClick.length", 2) == 2
    assert delivered.id not in firefox.evaluate("shownAtClick[1]")

    firefox.close(opened)
    asyncio.run(sender.aclose())
    firefox.evaluate("client.disablePush({scope: '/client/'})")


def test_a_backend_publish_with_push_reaches_a_page_gone_offline_and_a_read_elsewhere_closes_it(
    replica, mozpush, firefox
):
    """The whole path: a page enables push and closes its socket; a backend publishes with `push`
    (fallback `offline` by default); the service queues it, sends it through the local push service,
    and the worker shows it; the user reads it on another device (REST); the service pushes `read`
    and the worker closes it."""
    user = "ff-bob"
    firefox.goto(f"{replica.url}/demo")
    assert firefox.evaluate(setup(user)) is True
    welcomed = 'new Promise((r) => { client.on("welcome", () => r(true)); client.connect(); })'
    assert firefox.evaluate(welcomed) is True
    enabled = firefox.evaluate('client.enablePush({serviceWorker: "/client/notify-sw.js"})')
    assert enabled["endpoint"].startswith(f"{mozpush.origin}/wpush/")
    firefox.evaluate("client.close()")

    body = {
        "event": "order.shipped",
        "data": {"order": 8},
        "push": {"title": "Order 8 shipped", "body": "Arrives Friday", "tag": "order-8", "url": f"{replica.url}/demo"},
    }
    published = None
    for _ in range(int(20 * TIMEOUT)):  # until the closed socket is gone: only then is it pushed
        answer = httpx.post(f"{replica.url}/notify/{user}", json=body, headers=publisher_headers(), timeout=10)
        assert answer.status_code == 202, answer.text
        if answer.json()["online"] == 0:
            published = answer.json()
            break
        time.sleep(0.1)
    assert published is not None, "the page's socket never closed"

    shown = f"""{REGISTRATION}.then((r) => r.getNotifications())
      .then((ns) => ns.map((n) => ({{title: n.title, body: n.body, tag: n.tag, id: n.data.id}})))"""
    wanted = [{"title": "Order 8 shipped", "body": "Arrives Friday", "tag": "order-8", "id": published["id"]}]
    assert poll(firefox, shown, wanted) == wanted, firefox.log[-30:]
    assert mozpush.refused == []

    # Read on another device: the worker is told to close what it shows up to that id.
    marked = httpx.post(
        f"{replica.url}/me/notifications/read",
        json={"up_to": published["id"]},
        headers={"Authorization": f"Bearer {token(user)}"},
        timeout=10,
    )
    assert marked.status_code == 200, marked.text
    closed = 'swMessages.filter((m) => m.type === "read").map((m) => m.closed)'
    assert poll(firefox, f"{closed}.length", 1) == 1, firefox.log[-30:]
    assert firefox.evaluate(closed) == [[published["id"]]]
    assert poll(firefox, f"{shown}.then((ns) => ns.length)", 0) == 0
    firefox.evaluate("client.disablePush({scope: '/client/'})")


def test_the_demo_page_enables_and_disables_push_and_shows_it_on_each_notification(replica, mozpush, firefox):
    """The demo's "Enable push" button appears because the service has a VAPID key; clicking it
    registers this browser as a device of the page's user, and every notification shows that push
    is on; clicking again removes the device and the notifications say push is off."""
    firefox.goto(f"{replica.url}/demo?user=ff-demo")
    toggle = 'document.getElementById("push-toggle")'
    assert poll(firefox, f"!{toggle}.hidden", True) is True
    assert firefox.evaluate(f"{toggle}.textContent") == "Enable push"
    hello = {"event": "demo.hello", "data": 1}
    posted = httpx.post(f"{replica.url}/notify/ff-demo", json=hello, headers=publisher_headers(), timeout=10)
    assert posted.status_code == 202, posted.text
    tags = """[...document.querySelectorAll('[data-testid="push-state"]')].map((t) => t.dataset.push)"""
    assert poll(firefox, tags, ["off"]) == ["off"]

    firefox.evaluate(f"{toggle}.click()")
    assert poll(firefox, f"{toggle}.dataset.enabled", "true") == "true"
    assert firefox.evaluate(f"{toggle}.textContent") == "Disable push"
    assert firefox.evaluate(tags) == ["on"]
    devices = httpx.get(f"{replica.url}/users/ff-demo/devices", headers=ADMIN, timeout=10).json()["devices"]
    assert [(d["kind"], d["origin"]) for d in devices] == [("webpush", mozpush.origin)]

    firefox.evaluate(f"{toggle}.click()")
    assert poll(firefox, f"{toggle}.dataset.enabled", "false") == "false"
    assert firefox.evaluate(tags) == ["off"]
    assert httpx.get(f"{replica.url}/users/ff-demo/devices", headers=ADMIN, timeout=10).json()["devices"] == []


def test_the_push_service_refuses_a_vapid_jwt_that_a_real_one_would(replica, mozpush, firefox):
    """The local push service is only worth testing against if it checks VAPID as a real one does:
    a JWT signed with another key than the subscription's applicationServerKey, for another
    audience, or expiring beyond 24 hours is answered 401 and never reaches the browser."""
    firefox.goto(f"{replica.url}/demo?user=ff-vapid")
    assert firefox.evaluate(SETUP) is True
    # Registered for the whole origin: the worker is served with `Service-Worker-Allowed: /`.
    enabled = firefox.evaluate('client.enablePush({serviceWorker: "/client/notify-sw.js", scope: "/"})')
    assert firefox.evaluate('navigator.serviceWorker.getRegistration("/").then((r) => r.scope)') == f"{replica.url}/"
    channel = enabled["endpoint"].rsplit("/", 1)[1]
    subscription = firefox.evaluate(SUBSCRIPTION.replace('"/client/"', '"/"'))
    now = int(time.time())
    own_key = serialization.load_pem_private_key(PEM.encode(), None)
    other_key = serialization.load_pem_private_key(vapid_pem().encode(), None)
    refusals = {
        "another key": (other_key, {"aud": mozpush.origin, "exp": now + 3600, "sub": SUBJECT}),
        "another audience": (own_key, {"aud": "https://push.example.com", "exp": now + 3600, "sub": SUBJECT}),
        "beyond 24 hours": (own_key, {"aud": mozpush.origin, "exp": now + 25 * 3600, "sub": SUBJECT}),
    }
    headers = {"TTL": "60", "Content-Encoding": "aes128gcm"}
    for what, (key, claims) in refusals.items():
        signed = jwt.encode(claims, key, algorithm="ES256")
        authorization = f"vapid t={signed},k={public_of(PEM)}"
        answer = httpx.post(enabled["endpoint"], headers={**headers, "Authorization": authorization}, content=b"x")
        assert answer.status_code == 401, what
    assert len(mozpush.refused) == len(refusals)

    sender = service_sender(mozpush)
    hello = PushMessage(id="1795615905000-1", event="hello", title="Hello", ts=1795615905000, ttl=60)
    assert send(sender, enabled["deviceId"], subscription, hello) == "sent 201"
    asyncio.run(sender.aclose())
    assert len(mozpush.wait_for_ack(channel, 1)) == 1  # the signed one alone reached Firefox
    firefox.evaluate("client.disablePush({scope: '/'})")


def test_enable_push_says_why_it_cannot(mozpush, firefox):
    """On a service without a VAPID key enablePush rejects with push_unavailable; on one whose
    allowed origins do not include the browser's push service, with device_refused and the
    service's reason, and the subscription is dropped again: nothing is left registered."""
    with running({"NOTIFY_DEMO": "true"}) as bare:
        firefox.goto(f"{bare.url}/demo?user=ff-none")
        assert firefox.evaluate(SETUP) is True
        failed = firefox.evaluate("client.enablePush().then(() => null, (e) => ({code: e.code, message: e.message}))")
        assert failed == {
            "code": "push_unavailable",
            "message": "push_unavailable: the service has no Web Push (HTTP 404)",
        }
    env = {
        "NOTIFY_VAPID_PRIVATE_KEY": PEM,
        "NOTIFY_VAPID_SUBJECT": SUBJECT,
        "NOTIFY_PUSH_ALLOWED_ORIGINS": "https://push.example.com",
        "NOTIFY_DEMO": "true",
    }
    with running(env) as elsewhere:
        firefox.goto(f"{elsewhere.url}/demo?user=ff-refused")
        assert firefox.evaluate(SETUP) is True
        failed = firefox.evaluate("client.enablePush().then(() => null, (e) => ({code: e.code, reason: e.reason}))")
        assert failed["code"] == "device_refused"
        assert failed == {"code": "device_refused", "reason": "subscription.endpoint must be an https URL"}
        assert firefox.evaluate(SUBSCRIPTION.replace(".then((s) => s.toJSON())", "")) is None
        listed = httpx.get(f"{elsewhere.url}/users/ff-refused/devices", headers=ADMIN, timeout=10)
        assert listed.json()["devices"] == []
