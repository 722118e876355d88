// notify-sw.js: the service worker of notify-service's Web Push. No build step, no dependencies.
//
//   // served by the service at /client/notify-sw.js (with `Service-Worker-Allowed: /`); a site may
//   // also serve a copy at its root to control every page:
//   await client.enablePush({ serviceWorker: "/client/notify-sw.js", scope: "/" });
//
// A push is the JSON the service sends (docs/protocol.md, "Push"):
//   {"id","event","title","body","url","icon","tag","data","ts"}: shown as a notification whose
//     `data` is {id, event, url, data, ts}; a click opens `url` (or focuses a page already on it);
//   {"type":"read","up_to":id}: the user read up to `id` on some device; every notification shown
//     with an id at or below it is closed.
// Open pages of the worker's origin get a message `{source: "notify-sw", type: "push" | "read" |
// "click", ...}` for each (navigator.serviceWorker.onmessage).

/** Compare two ids of the user's stream ("<ms>-<seq>", each a decimal integer), as notify.js does: a
 * copy, because a classic worker script cannot import the module (module workers are not everywhere). */
function compareIds(a, b) {
  const [am, as] = String(a).split("-");
  const [bm, bs] = String(b).split("-");
  if (am.length !== bm.length) return am.length - bm.length;
  if (am !== bm) return am < bm ? -1 : 1;
  if (as.length !== bs.length) return as.length - bs.length;
  return as === bs ? 0 : as < bs ? -1 : 1;
}

const ID = /^[0-9]{1,15}-[0-9]{1,19}$/;

async function tellPages(message) {
  const pages = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  for (const page of pages) page.postMessage({ source: "notify-sw", ...message });
}

async function show(push) {
  const options = {
    body: push.body ?? undefined,
    icon: push.icon ?? undefined,
    tag: push.tag ?? undefined,
    data: { id: push.id, event: push.event, url: push.url ?? null, data: push.data ?? null, ts: push.ts },
  };
  await self.registration.showNotification(push.title, options);
  await tellPages({ type: "push", notification: push });
}

async function closeRead(upTo) {
  const shown = await self.registration.getNotifications();
  const closed = [];
  for (const n of shown) {
    const id = n.data && n.data.id;
    if (typeof id === "string" && ID.test(id) && compareIds(id, upTo) <= 0) {
      n.close();
      closed.push(id);
    }
  }
  await tellPages({ type: "read", up_to: upTo, closed });
}

async function handle(event) {
  let push;
  try {
    push = event.data ? event.data.json() : null;
  } catch {
    push = null;
  }
  if (push && push.type === "read") {
    if (typeof push.up_to === "string" && ID.test(push.up_to)) await closeRead(push.up_to);
    return;
  }
  // A push the worker cannot read still has to show something: browsers penalise silent pushes.
  if (!push || typeof push.title !== "string") push = { title: "New notification" };
  await show(push);
}

self.addEventListener("push", (event) => event.waitUntil(handle(event)));

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const data = event.notification.data || {};
  event.waitUntil(
    (async () => {
      await tellPages({ type: "click", id: data.id ?? null, url: data.url ?? null });
      if (!data.url) return;
      const target = new URL(data.url, self.location.origin).href;
      const pages = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
      const open = pages.find((page) => page.url === target);
      if (open) await open.focus();
      else await self.clients.openWindow(target);
    })(),
  );
});

// A new version takes over at once: the worker keeps no state of its own worth waiting for.
self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));
