// notify.js: the browser client of notify-service. A dependency-free ES module; no build step.
//
//   import { NotifyClient } from "/client/notify.js";
//   const client = new NotifyClient({ urls: ["https://a.example", "https://b.example"], getToken });
//   client.on("order.shipped", (n) => console.log(n.data));
//   client.on("unread", (count) => badge.textContent = String(count));
//   client.connect();
//
// Topics (see "Topics" in docs/protocol.md):
//
//   await client.join("chat:lobby");                          // resolves with the `joined` frame (`info`: a join hook's answer)
//   await client.join("doc:42", { token: () => topicToken("doc:42") });  // a topic token (or a string)
//   client.onTopic("chat:lobby", (m) => show(m.from, m.data));  // the topic's messages
//   const { id } = await client.publish("chat:lobby", "msg", { text: "hi" });  // resolved by `published`
//   client.signal("chat:lobby", "typing", true);               // fire and forget: no answer, no id
//   const { users, count } = await client.presence("chat:lobby");  // the `members` frame
//   client.on("presence", (p) => ...);  // {topic, joined, left, count}: once per interval; a large topic: {topic, count}
//   client.on("signal", (s) => ...);    // {topic, event, data, from}
//   await client.leave("chat:lobby");
//
// Topic messages go to `onTopic(topic, fn)` handlers and to "message" handlers, never to
// "notification" or to handlers of an event name. `publish` and `presence` reject with a
// NotifyError (`code`, `topic`) when the server answers an error frame for that topic, or with
// code "not_connected" / "connection_lost" when there is no open WebSocket or it closed before
// the answer (a publish may then have happened or not). `join` resolves once joined and rejects
// when the server refuses the topic (the topic is then dropped); a joined topic stays joined
// across reconnects until `leave`, or until the server removes the user ("left" with
// reason "removed").
//
// It speaks the protocol in docs/protocol.md: WebSocket on /ws (Server-Sent Events on /events as
// the fallback), app-level pings, token refresh before `exp`, reconnect with capped exponential
// backoff and full jitter, rotating through `urls`. Ids are ordered only within one stream, so it
// keeps one cursor per stream: the user's (`lastUserId`), the broadcast stream's
// (`lastBroadcastId`) and each topic's (`lastTopicId(topic)`); before anything of a stream was
// seen, the cursor is the welcome's `cursor` / `broadcast_cursor` or the topic's `joined.cursor`.
// A reconnect resumes with `since` / `broadcast_since` and joins every topic again with `since`
// (over SSE: `topics=` and a `since` position list); one stream's id is never another's cursor.
// Close 4401 (token refused) and 4403 (the server disconnected this user: logout everywhere, a
// ban) are never retried with the same token; after 4403 the client waits in state
// "unauthorized" (code 4403) without asking `getToken`, until `setToken()` or `connect()`.

/**
 * @typedef {Object} Notification
 * @property {"notification"} type
 * @property {string} id         unique within its stream, only grows there; opaque to clients
 * @property {string} event      the publisher's event name, e.g. "order.shipped"
 * @property {*} data            the publisher's JSON payload
 * @property {number} ts         publish time, unix milliseconds
 * @property {boolean} [broadcast] true for notifications sent to everyone
 * @property {string} [topic]    set for a topic's messages
 * @property {string} [from]     the member who published a topic message (none when a backend did)
 */

/**
 * @typedef {Object} Welcome
 * @property {"welcome"} type
 * @property {string} user
 * @property {string} connection_id
 * @property {boolean} [recovered]  present when resuming: false means some notifications were lost
 * @property {string} [cursor]      where the user's stream stands (when not resuming)
 * @property {string} [broadcast_cursor]  where the broadcast stream stands (when not resuming)
 * @property {number} expires_at     the token's `exp`, unix seconds
 * @property {Transport} transport
 * @property {string} url            base URL of the server this connection is on
 */

/** @typedef {"websocket" | "sse"} Transport */

/**
 * idle: not started; connecting: opening a connection; open: welcomed by a server;
 * reconnecting: waiting to retry; unauthorized: the token was refused (4401) or the server
 * disconnected the user (4403), waiting for a new one (`setToken`, or for 4401 `getToken` giving
 * another); closed: `close()` was called or the server closed normally.
 * @typedef {"idle" | "connecting" | "open" | "reconnecting" | "unauthorized" | "closed"} State
 */

/**
 * @typedef {Object} StateChange
 * @property {State} state
 * @property {Transport} transport
 * @property {string | null} url       base URL of the server in use (or about to be)
 * @property {number} attempt          consecutive failed attempts so far
 * @property {number} [delay]          for "reconnecting": milliseconds until the next attempt
 * @property {number} [code]           the close code that led here, when there was one
 */

/**
 * @typedef {Object} NotifyOptions
 * @property {string} [url]        base URL of a replica ("https://host:port"; "ws(s)://host/ws" also
 *                                 works). Defaults to the page's origin.
 * @property {string[]} [urls]     several replicas: each reconnect moves on to the next one
 * @property {string} [token]      a client JWT (its `sub` is the user)
 * @property {() => (string | Promise<string>)} [getToken]  gives a fresh token; called before the
 *                                 first connect when no `token` is given, before `exp`, and after 4401
 * @property {"auto" | Transport} [transport="auto"]  "auto": WebSocket, SSE after `sseAfter` failures
 * @property {string} [since]      resume the user's stream after this id on the first connect
 * @property {string} [broadcastSince]  resume the broadcast stream after this id on the first connect
 * @property {number} [unread]     initial unread count (e.g. from GET /me/notifications)
 * @property {number} [minDelay=500]     backoff base, milliseconds
 * @property {number} [maxDelay=15000]   backoff cap, milliseconds
 * @property {number} [pingInterval=20000]  send {"type":"ping"} this often (milliseconds)
 * @property {number} [pongTimeout=10000]   no frame this long after a ping: the socket is dead
 * @property {number} [connectTimeout=10000] an attempt that is not welcomed in time fails
 * @property {number} [refreshMargin=60]  seconds before `exp` to refresh the token
 * @property {number} [sseAfter=3]  consecutive WebSocket failures before trying SSE ("auto")
 * @property {number} [dedupe=1000] how many recent ids are remembered to drop duplicates
 * @property {number} [sendRate=15] frames per second this client sends at most (the server closes
 *                                 with 4029 above NOTIFY_MAX_INBOUND_RATE, 20 by default); more wait
 */

/**
 * @typedef {Object} JoinOptions
 * @property {string | ((topic: string) => (string | Promise<string>))} [token]  a topic token (a
 *           JWT whose `topic` claim is this topic), or a function giving a current one; asked
 *           again on every rejoin. WebSocket only: over SSE only the connection token's claim counts.
 * @property {string} [since]  resume the topic after this id on the first join
 */

// Event names of the client itself: a notification whose event is one of these reaches
// "notification" handlers only.
const LIFECYCLE = new Set([
  "notification", "state", "welcome", "unread", "error", "resync", "refreshed", "close",
  "message", "joined", "left", "presence", "signal",
]);
const MAX_AUTH_FAILURES = 3;
const MAX_TIMER = 2 ** 31 - 1;
// Frames the server answers only when they fail: how long to wait for their error is bounded by
// a ping sent before the next frame that expects an answer (the server answers in order).
const MAYBE_ANSWERED = new Set(["ack", "signal"]);

/** An error the server answered (or a request that could not get an answer). */
export class NotifyError extends Error {
  /**
   * @param {string} code @param {string} message @param {string} [topic]
   * @param {string} [reason]  a backend hook's reason for refusing a join or a publish (`forbidden`)
   */
  constructor(code, message, topic, reason) {
    super(topic === undefined ? `${code}: ${message}` : `${code} (${topic}): ${message}`);
    this.name = "NotifyError";
    this.code = code;
    this.topic = topic;
    this.reason = reason;
  }
}

/** Compare two notification ids ("<ms>-<seq>") of the same stream; never compare two streams' ids. */
export function compareIds(a, b) {
  const [am, as] = a.split("-");
  const [bm, bs] = b.split("-");
  if (am.length !== bm.length) return am.length - bm.length;
  if (am !== bm) return am < bm ? -1 : 1;
  if (as.length !== bs.length) return as.length - bs.length;
  return as === bs ? 0 : as < bs ? -1 : 1;
}

/** The `exp` claim of a JWT (unix seconds), or null. The signature is the server's business. */
export function tokenExpiry(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

const DEVICE_KEY = "notify.deviceId";

/** This browser's device id (localStorage), made on first use when `create`; null otherwise. */
function storedDeviceId(create) {
  let id = localStorage.getItem(DEVICE_KEY);
  if (!id && create) {
    id = "web-" + crypto.randomUUID().replace(/-/g, "");
    localStorage.setItem(DEVICE_KEY, id);
  }
  return id;
}

/** Resolves once the registration has an active worker. Not `navigator.serviceWorker.ready`: that
 * waits for a worker whose scope covers this page, which may never come. */
function activated(registration) {
  if (registration.active) return Promise.resolve(registration);
  const worker = registration.installing || registration.waiting;
  return new Promise((resolve, reject) => {
    worker.addEventListener("statechange", () => {
      if (worker.state === "activated") resolve(registration);
      if (worker.state === "redundant") reject(new NotifyError("push_unsupported", "the service worker failed to install"));
    });
    if (registration.active) resolve(registration); // activated before the listener was there
  });
}

function base64UrlBytes(text) {
  const b64 = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

function sameKey(buffer, publicKey) {
  if (!buffer) return false;
  const a = new Uint8Array(buffer);
  const b = base64UrlBytes(publicKey);
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

function baseUrl(url) {
  const origin = typeof location !== "undefined" ? location.href : undefined;
  const u = new URL(url, origin);
  if (u.protocol === "ws:") u.protocol = "http:";
  if (u.protocol === "wss:") u.protocol = "https:";
  let path = u.pathname.replace(/\/+$/, "");
  if (path.endsWith("/ws") || path.endsWith("/events")) path = path.slice(0, path.lastIndexOf("/"));
  return u.origin + path;
}

export class NotifyClient {
  /** @param {NotifyOptions} options */
  constructor(options = {}) {
    const urls = options.urls && options.urls.length ? options.urls : [options.url ?? "/"];
    /** @type {string[]} base URLs of the replicas */
    this.urls = urls.map(baseUrl);
    this.options = {
      transport: "auto", minDelay: 500, maxDelay: 15000, pingInterval: 20000, pongTimeout: 10000,
      connectTimeout: 10000, refreshMargin: 60, sseAfter: 3, dedupe: 1000, sendRate: 15, ...options,
    };
    /** @type {State} */
    this.state = "idle";
    /** @type {Transport} */
    this.transport = this.options.transport === "sse" ? "sse" : "websocket";
    /** @type {number} unread notifications of this user (broadcasts and topics do not count) */
    this.unread = options.unread ?? 0;
    /** @type {string | null} id of the connection the server gave in its welcome */
    this.connectionId = null;
    /** @type {string | null} the user stream's cursor: the newest user-notification id seen */
    this.lastUserId = options.since ?? null;
    /** @type {string | null} the broadcast stream's cursor: the newest broadcast id seen */
    this.lastBroadcastId = options.broadcastSince ?? null;

    this._token = options.token ?? null;
    this._rejectedToken = null;
    this._authFailures = 0;
    this._index = 0;
    this._attempt = 0;
    this._wsFailures = 0;
    this._sseFailures = 0;
    // {kind, token, url, welcomed, close(code, reason), pending, outbox, joined, joining, ...}
    this._conn = null;
    this._generation = 0;
    this._retryTimer = null;
    this._refreshTimer = null;
    this._seen = new Set();
    this._seenOrder = [];
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /** @type {Map<string, Set<Function>>} topic -> handlers of its messages */
    this._topicHandlers = new Map();
    /** @type {Map<string, {lastId: string | null, token: any, frame: object | null, waiters: Array}>} */
    this._topics = new Map();
    this._onOnline = () => { if (this.state === "reconnecting") this.reconnect(); };
  }

  /** Base URL of the server in use (or about to be). */
  get url() {
    return this.urls[this._index];
  }

  /** The user stream's cursor (what `ack()` marks read up to); the same as `lastUserId`. */
  get lastId() {
    return this.lastUserId;
  }

  /** The topics this client is in, or joining (joined again after every reconnect). */
  get topics() {
    return [...this._topics.keys()];
  }

  /**
   * What the namespace's join hook answered as `info` when this topic was last joined; null without.
   * @param {string} topic
   * @returns {*}
   */
  topicInfo(topic) {
    return this._topics.get(topic)?.frame?.info ?? null;
  }

  /**
   * A topic's cursor: the newest id seen in it, or its `joined` cursor; null before either.
   * @param {string} topic
   * @returns {string | null}
   */
  lastTopicId(topic) {
    return this._topics.get(topic)?.lastId ?? null;
  }

  /**
   * Listen to a notification event name ("order.shipped"), to every user or broadcast
   * notification ("notification"), or to a client event: "state" (StateChange), "welcome"
   * (Welcome), "unread" (count), "error" ({code, message, topic?}), "resync" ({reason}: refetch the
   * inbox), "refreshed" ({expires_at}), "close" ({code, reason, transport, url}); for topics:
   * "message" (every topic message), "joined" (the `joined` frame: {topic, cursor, recovered?,
   * count?, info?}; `recovered: false` means messages of the topic were lost; `info` is what the
   * namespace's join hook answered, also kept as `topicInfo(topic)`), "left" ({topic, reason?}:
   * "removed" when the server took the user out), "presence" ({topic, joined, left, count}, or {topic, count} above the server's member limit),
   * "signal" ({topic, event, data, from}). Notifications whose event name is one of these are
   * delivered to "notification" only. Returns a function that removes the handler.
   * @param {string} event
   * @param {(payload: any) => void} handler
   * @returns {() => void}
   */
  on(event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(handler);
    return () => this.off(event, handler);
  }

  /** @param {string} event @param {(payload: any) => void} handler */
  off(event, handler) {
    this._handlers.get(event)?.delete(handler);
  }

  /**
   * Listen to the messages of one topic (Notification frames with `topic`, `from`). Returns a
   * function that removes the handler. It does not join: see `join`.
   * @param {string} topic
   * @param {(message: Notification) => void} handler
   * @returns {() => void}
   */
  onTopic(topic, handler) {
    if (!this._topicHandlers.has(topic)) this._topicHandlers.set(topic, new Set());
    this._topicHandlers.get(topic).add(handler);
    return () => this._topicHandlers.get(topic)?.delete(handler);
  }

  /** Start (or restart after `close()`). Safe to call twice. */
  connect() {
    if (this.state !== "idle" && this.state !== "closed" && this.state !== "unauthorized") return;
    if (typeof addEventListener === "function") addEventListener("online", this._onOnline);
    this._attempt = 0;
    this._authFailures = 0;
    this._open();
  }

  /** Stop for good (until `connect()`): no reconnect, no timers. Topics stay joined for `connect()`. */
  close() {
    if (typeof removeEventListener === "function") removeEventListener("online", this._onOnline);
    this._clearRetry();
    this._generation += 1;
    clearTimeout(this._refreshTimer);
    this._drop(1000, "client closed");
    this._setState("closed");
  }

  /** Drop the current connection (if any) and connect again now, to the next server. */
  reconnect() {
    this._clearRetry();
    this._drop(1000, "client reconnect");
    this._index = (this._index + 1) % this.urls.length;
    this._open();
  }

  /**
   * Give a new token: it is sent on the live socket (refresh) or used for the next connection.
   * After a 4401 or 4403, this is what starts the client again.
   * @param {string} token
   */
  setToken(token) {
    this._token = token;
    if (this.state === "unauthorized") {
      this._authFailures = 0;
      this._attempt = 0;
      this._open();
    } else if (this._conn && this._conn.welcomed) {
      this._sendRefresh();
    }
  }

  /**
   * Mark everything up to `id` (default: the newest user notification seen) as read, on all the
   * user's devices. Over a WebSocket this is an `ack` frame; otherwise POST /me/notifications/read.
   * The server then sends the new count as an "unread" event.
   * @param {string} [id]  an id of the user's stream
   * @returns {Promise<void>}
   */
  async ack(id) {
    const upTo = id ?? this.lastUserId;
    if (!upTo) return;
    const conn = this._conn;
    if (conn && conn.welcomed && this._request(conn, { type: "ack", id: upTo }, { kind: "ack" })) return;
    const token = await this._currentToken();
    const response = await fetch(this.url + "/me/notifications/read", {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: JSON.stringify({ up_to: upTo }),
    });
    if (!response.ok) throw new Error(`ack failed: HTTP ${response.status}`);
    const body = await response.json();
    if (typeof body.unread === "number") this._setUnread(body.unread);
  }

  // ---- Web Push (docs/protocol.md, "Push")

  /**
   * Let the service reach this browser while no page is open: asks for notification permission,
   * registers the service worker, subscribes with the service's VAPID key (GET /push/vapid) and
   * registers the subscription as a device (PUT /me/devices/{id}). The device id is kept in
   * localStorage (`notify.deviceId`), so enabling again replaces this browser's device instead
   * of adding one. Rejects with a NotifyError: "push_unsupported" (no service worker or
   * PushManager), "permission_denied", "push_unavailable" (the service has no VAPID key), or
   * "device_refused" (the service refused the subscription; `reason` says why).
   * @param {{serviceWorker?: string, scope?: string}} [options]
   * @returns {Promise<{deviceId: string, endpoint: string}>}
   */
  async enablePush({ serviceWorker = "/client/notify-sw.js", scope } = {}) {
    if (typeof navigator === "undefined" || !navigator.serviceWorker || typeof PushManager === "undefined") {
      throw new NotifyError("push_unsupported", "this browser has no service workers or Push API");
    }
    const permission = await Notification.requestPermission();
    if (permission !== "granted") throw new NotifyError("permission_denied", `notification permission is ${permission}`);
    const vapid = await fetch(this.url + "/push/vapid");
    if (!vapid.ok) throw new NotifyError("push_unavailable", `the service has no Web Push (HTTP ${vapid.status})`);
    const { public_key: publicKey } = await vapid.json();
    const registration = await navigator.serviceWorker.register(serviceWorker, scope ? { scope } : undefined);
    await activated(registration);
    let subscription = await registration.pushManager.getSubscription();
    if (subscription && !sameKey(subscription.options.applicationServerKey, publicKey)) {
      await subscription.unsubscribe(); // made for another VAPID key: the service could not push to it
      subscription = null;
    }
    subscription ??= await registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: base64UrlBytes(publicKey),
    });
    const deviceId = storedDeviceId(true);
    const answer = await this._deviceRequest("PUT", deviceId, { kind: "webpush", subscription: subscription.toJSON() });
    if (!answer.ok) {
      const body = await answer.json().catch(() => ({}));
      await subscription.unsubscribe();
      throw new NotifyError("device_refused", `the service refused the device (HTTP ${answer.status})`, undefined, body.message);
    }
    return { deviceId, endpoint: subscription.endpoint };
  }

  /**
   * Stop pushes to this browser: unsubscribes and removes the device (DELETE /me/devices/{id}).
   * @param {{scope?: string}} [options]  the scope enablePush registered the worker with, if not its default
   * @returns {Promise<void>}
   */
  async disablePush({ scope } = {}) {
    const deviceId = storedDeviceId(false);
    if (typeof navigator !== "undefined" && navigator.serviceWorker) {
      const registration = await navigator.serviceWorker.getRegistration(scope);
      const subscription = registration && (await registration.pushManager.getSubscription());
      if (subscription) await subscription.unsubscribe();
    }
    if (!deviceId) return;
    const answer = await this._deviceRequest("DELETE", deviceId);
    if (!answer.ok && answer.status !== 404) throw new Error(`disablePush failed: HTTP ${answer.status}`);
    localStorage.removeItem(DEVICE_KEY);
  }

  async _deviceRequest(method, deviceId, body) {
    const token = await this._currentToken();
    return fetch(`${this.url}/me/devices/${deviceId}`, {
      method,
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  // ---- topics

  /**
   * Join a topic, now or as soon as connected, and again after every reconnect (resuming after
   * the last message seen in it). Resolves with the `joined` frame; rejects with a NotifyError when
   * the server refuses the topic (`forbidden`, `full`, `unknown_namespace`, ...).
   * @param {string} topic
   * @param {JoinOptions} [options]
   * @returns {Promise<object>}
   */
  join(topic, { token, since } = {}) {
    if (typeof topic !== "string" || !topic) return Promise.reject(new TypeError("join needs a topic name"));
    let state = this._topics.get(topic);
    if (!state) {
      state = { lastId: since ?? null, token: token ?? null, frame: null, waiters: [] };
      this._topics.set(topic, state);
    } else if (token !== undefined) {
      state.token = token;
    }
    const conn = this._conn;
    if (conn && conn.joined.has(topic)) return Promise.resolve(state.frame);
    const joined = new Promise((resolve, reject) => state.waiters.push({ resolve, reject }));
    if (conn && conn.welcomed) {
      if (conn.kind === "websocket") this._sendJoin(conn, topic);
      else if (!conn.topics.includes(topic)) this._reopenSse();
    } else if (conn && conn.kind === "sse" && !conn.topics.includes(topic)) {
      this._reopenSse();
    }
    return joined;
  }

  /**
   * Leave a topic: no more of its messages, no rejoin. Resolves once the server said `left` (at
   * once when not connected). A `join` still waiting is rejected with code "left".
   * @param {string} topic
   * @returns {Promise<void>}
   */
  leave(topic) {
    const state = this._topics.get(topic);
    this._topics.delete(topic);
    const error = new NotifyError("left", "left before joined", topic);
    if (state) for (const waiter of state.waiters.splice(0)) waiter.reject(error);
    const conn = this._conn;
    if (!conn) return Promise.resolve();
    if (conn.kind === "sse") {
      if (conn.topics.includes(topic)) this._reopenSse();
      return Promise.resolve();
    }
    const member = conn.joined.has(topic) || conn.joining.has(topic);
    conn.joined.delete(topic);
    conn.joining.delete(topic);
    if (!member) return Promise.resolve();
    return new Promise((resolve) => {
      const entry = { kind: "leave", topic, resolve: () => resolve(), reject: () => resolve() };
      if (!this._request(conn, { type: "leave", topic }, entry)) resolve();
    });
  }

  /**
   * Publish a message to a topic this client joined (where its namespace allows members to).
   * Every member gets it, this client included. Resolves with `{topic, id}` once stored.
   * @param {string} topic
   * @param {string} event
   * @param {*} [data]
   * @returns {Promise<{type: "published", topic: string, id: string}>}
   */
  publish(topic, event, data = null) {
    return this._ask(topic, { type: "publish", topic, event, data }, "publish");
  }

  /**
   * Send a signal (typing, a cursor) to the topic's other member sockets: never stored, no id, no
   * answer. Returns false when there is no open WebSocket to send it on; a refusal comes as an
   * "error" event with its `topic`.
   * @param {string} topic
   * @param {string} event
   * @param {*} [data]
   * @returns {boolean}
   */
  signal(topic, event, data = null) {
    const conn = this._conn;
    if (!conn || !conn.welcomed) return false;
    return this._request(conn, { type: "signal", topic, event, data }, { kind: "signal", topic });
  }

  /**
   * The topic's members (where its namespace has presence): the `members` frame,
   * `{topic, users: [...sorted, at most 1000], count}`.
   * @param {string} topic
   * @returns {Promise<{type: "members", topic: string, users: string[], count: number}>}
   */
  presence(topic) {
    return this._ask(topic, { type: "presence", topic }, "presence");
  }

  _ask(topic, frame, kind) {
    return new Promise((resolve, reject) => {
      const conn = this._conn;
      const entry = { kind, topic, resolve, reject };
      if (!conn || !conn.welcomed || !this._request(conn, frame, entry)) {
        reject(new NotifyError("not_connected", `${kind} needs an open WebSocket`, topic));
      }
    });
  }

  _sendJoin(conn, topic) {
    const state = this._topics.get(topic);
    if (!state || conn.kind !== "websocket" || conn.joining.has(topic) || conn.joined.has(topic)) return;
    conn.joining.add(topic);
    const send = (token) => {
      if (this._conn !== conn || this._topics.get(topic) !== state || !conn.joining.has(topic)) return;
      const frame = { type: "join", topic };
      // The topic's own cursor; nothing of the topic arrives on this socket before `joined`.
      if (state.lastId) frame.since = state.lastId;
      if (token) frame.token = token;
      if (!this._request(conn, frame, { kind: "join", topic })) conn.joining.delete(topic);
    };
    if (typeof state.token !== "function") {
      send(state.token); // at once: a publish right after join() is sent after it
      return;
    }
    Promise.resolve()
      .then(() => state.token(topic))
      .then(send, (err) => {
        conn.joining.delete(topic);
        this._emit("error", { code: "token_unavailable", message: String(err && err.message || err), topic });
        this._joinRefused(conn, topic, { code: "unavailable", message: "no topic token" });
      });
  }

  _joinRefused(conn, topic, frame) {
    conn.joining.delete(topic);
    const state = this._topics.get(topic);
    if (!state) return;
    if (frame.code === "already_joined") {
      conn.joined.add(topic);
      state.frame ??= { type: "joined", topic };
      for (const waiter of state.waiters.splice(0)) waiter.resolve(state.frame);
      return;
    }
    if (frame.code === "unavailable") {
      // The broker is away for a moment: try again on this connection (or the next one joins anyway).
      setTimeout(() => {
        if (this._conn !== conn || this._topics.get(topic) !== state) return;
        if (conn.kind === "websocket") this._sendJoin(conn, topic);
        else this._reopenSse();
      }, 1000 + Math.random() * 2000);
      return;
    }
    this._topics.delete(topic);
    const error = new NotifyError(frame.code, frame.message ?? "join refused", topic, frame.reason);
    for (const waiter of state.waiters.splice(0)) waiter.reject(error);
  }

  _reopenSse() {
    if (!this._conn || this._conn.kind !== "sse") return;
    // The topics of an SSE stream are fixed when it opens: open another; the cursors avoid gaps.
    this._drop(1000, "topics changed");
    this._open();
  }

  // ---- connection lifecycle

  async _open() {
    this._clearRetry();
    this._setState("connecting");
    const generation = ++this._generation;
    let token;
    try {
      token = await this._currentToken();
    } catch (err) {
      this._emit("error", { code: "token_unavailable", message: String(err && err.message || err) });
      this._scheduleRetry();
      return;
    }
    if (this.state !== "connecting" || generation !== this._generation) return; // closed or restarted meanwhile
    if (!token || token === this._rejectedToken) {
      this._setState("unauthorized");
      return;
    }
    if (this.options.transport === "auto") {
      if (this.transport === "websocket" && this._wsFailures >= this.options.sseAfter) {
        this.transport = "sse";
        this._sseFailures = 0;
      } else if (this.transport === "sse" && this._sseFailures >= this.options.sseAfter) {
        this.transport = "websocket";
        this._wsFailures = 0;
      }
    }
    let conn;
    try {
      conn = this.transport === "sse" ? this._openSse(token) : this._openWebSocket(token);
    } catch (err) {
      this._emit("error", { code: "connect_failed", message: String(err && err.message || err) });
      this._index = (this._index + 1) % this.urls.length;
      this._scheduleRetry();
      return;
    }
    this._conn = conn;
    conn.connectTimer = setTimeout(() => {
      if (this._conn === conn && !conn.welcomed) this._lost(conn, 4000, "connect timeout");
    }, this.options.connectTimeout);
  }

  /** What every connection keeps: the requests awaiting an answer, the outbox, topic memberships. */
  _newConn(kind, token) {
    return {
      kind, token, welcomed: false, url: this.url, pending: [], outbox: [], topics: [],
      joined: new Set(), joining: new Set(), credit: this.options.sendRate, creditAt: Date.now(),
      close() {},
    };
  }

  _openWebSocket(token) {
    const params = new URLSearchParams({ token });
    // Each stream's own cursor, or none (that stream starts live): never one stream's id for another.
    if (this.lastUserId) params.set("since", this.lastUserId);
    if (this.lastBroadcastId) params.set("broadcast_since", this.lastBroadcastId);
    const url = this.url.replace(/^http/, "ws") + "/ws?" + params;
    const conn = this._newConn("websocket", token);
    let socket;
    try {
      socket = new globalThis.WebSocket(url);
    } catch (err) {
      queueMicrotask(() => this._lost(conn, 1006, String(err)));
      return conn;
    }
    conn.socket = socket;
    conn.close = (code, reason) => {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
      try { socket.close(code === 1000 ? 1000 : 4000, reason); } catch { /* already closing */ }
    };
    socket.onmessage = (event) => {
      if (this._conn !== conn) return;
      this._alive(conn);
      this._frame(conn, event.data);
    };
    socket.onclose = (event) => {
      if (this._conn === conn) this._lost(conn, event.code, event.reason);
    };
    socket.onopen = () => {
      if (this._conn === conn) this._startPings(conn);
    };
    return conn;
  }

  _openSse(token) {
    const params = new URLSearchParams({ token });
    const conn = this._newConn("sse", token);
    conn.topics = [...this._topics.keys()];
    if (conn.topics.length) params.set("topics", conn.topics.join(","));
    // One position for every stream of the connection, in the server's order: user, broadcast,
    // then the topics as `topics=` names them; an empty place starts that stream live.
    const places = [this.lastUserId, this.lastBroadcastId, ...conn.topics.map((t) => this._topics.get(t).lastId)];
    if (places.some(Boolean)) params.set("since", places.map((p) => p ?? "").join(","));
    const source = new EventSource(this.url + "/events?" + params);
    conn.source = source;
    conn.close = () => {
      source.onmessage = source.onerror = null;
      source.close();
    };
    source.onmessage = (event) => {
      if (this._conn === conn) this._frame(conn, event.data);
    };
    source.addEventListener("close", (event) => {
      if (this._conn !== conn) return;
      let code = 1000;
      try { code = JSON.parse(event.data).code; } catch { /* keep 1000 */ }
      this._lost(conn, code, "server ended the stream");
    });
    source.onerror = () => {
      if (this._conn !== conn) return;
      // EventSource would retry by itself, with the same URL and token; this client retries instead
      // (next server, fresh cursors and token). A refused stream (401) looks the same as a dead one.
      const exp = tokenExpiry(conn.token);
      const expired = !conn.welcomed && exp !== null && exp * 1000 <= Date.now();
      this._lost(conn, expired ? 4401 : 1006, "stream error");
    };
    return conn;
  }

  /** A connection ended (or failed) without this client asking for it. */
  _lost(conn, code, reason) {
    if (this._conn !== conn) return;
    this._conn = null;
    this._end(conn);
    conn.close(code, reason);
    this._emit("close", { code, reason, transport: conn.kind, url: conn.url });
    if (!conn.welcomed && code !== 4401 && code !== 4403 && code !== 4029) {
      // Never welcomed: count towards the switch to the other transport ("auto").
      if (conn.kind === "websocket") this._wsFailures += 1;
      else this._sseFailures += 1;
    }
    if (code === 1000) {
      this._setState("closed", { code });
      return;
    }
    if (code === 4401 || code === 4403) {
      this._unauthorized(conn, code);
      return;
    }
    this._index = (this._index + 1) % this.urls.length;
    if (code === 1012) {
      // The replica is draining: come back soon, elsewhere, without counting it as a failure.
      this._scheduleRetry(Math.random() * 1000, code);
      return;
    }
    if (code === 4029) this._attempt = Math.max(this._attempt, 3);
    this._scheduleRetry(undefined, code);
  }

  _unauthorized(conn, code) {
    this._rejectedToken = conn.token;
    this._authFailures += 1;
    if (this._token === conn.token) this._token = null;
    // 4403: the server disconnected this user on purpose; only the application may start again.
    if (code === 4403 || !this.options.getToken || this._authFailures > MAX_AUTH_FAILURES) {
      this._setState("unauthorized", { code });
      return;
    }
    // getToken may give a new token; if it gives the refused one again, wait for setToken.
    this._scheduleRetry(undefined, code);
  }

  _scheduleRetry(delay, code) {
    this._clearRetry();
    if (delay === undefined) {
      const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * 2 ** this._attempt);
      delay = Math.random() * ceiling; // full jitter
      this._attempt += 1;
    }
    this._setState("reconnecting", { delay: Math.round(delay), code });
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._open();
    }, delay);
  }

  _clearRetry() {
    if (this._retryTimer !== null) clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  _drop(code, reason) {
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      this._end(conn);
      conn.close(code, reason);
    }
  }

  /** A connection is over: stop its timers, and fail what still waited for its answers. */
  _end(conn) {
    this._stopTimers(conn);
    clearTimeout(conn.flushTimer);
    conn.outbox.length = 0;
    for (const entry of conn.pending.splice(0)) {
      entry.reject?.(new NotifyError("connection_lost", "the connection closed before the answer", entry.topic));
    }
  }

  // ---- sending: in order, paced under the server's inbound rate, answers matched in order

  /**
   * Send a frame on a WebSocket; `entry` ({kind, topic?, resolve?, reject?}) is settled by the
   * frame's answer. The server answers a socket's frames in the order it sent them, so the oldest
   * pending entry is the one an answer is for; an ack or a signal is answered only when it fails,
   * so a ping goes before the next frame that expects an answer, to tell "no error" from "not yet".
   */
  _request(conn, frame, entry) {
    if (conn.kind !== "websocket" || !conn.socket || conn.socket.readyState !== 1) return false;
    const tail = conn.pending[conn.pending.length - 1];
    if (entry.kind !== "ping" && !MAYBE_ANSWERED.has(entry.kind) && tail && MAYBE_ANSWERED.has(tail.kind)) {
      conn.pending.push({ kind: "ping" });
      conn.outbox.push('{"type":"ping"}');
    }
    conn.pending.push(entry);
    conn.outbox.push(JSON.stringify(frame));
    this._flush(conn);
    return true;
  }

  _flush(conn) {
    const rate = this.options.sendRate;
    const now = Date.now();
    conn.credit = Math.min(rate, conn.credit + ((now - conn.creditAt) / 1000) * rate);
    conn.creditAt = now;
    while (conn.outbox.length && conn.credit >= 1) {
      if (conn.socket.readyState !== 1) return;
      conn.socket.send(conn.outbox.shift());
      conn.credit -= 1;
    }
    if (conn.outbox.length && conn.flushTimer === undefined) {
      conn.flushTimer = setTimeout(() => {
        conn.flushTimer = undefined;
        if (this._conn === conn) this._flush(conn);
      }, Math.ceil(((1 - conn.credit) / rate) * 1000));
    }
  }

  /** The pending entry a server answer is for (removed from the queue), or null when unsolicited. */
  _settle(conn, frame) {
    const answers = (entry) => {
      switch (frame.type) {
        case "pong": return entry.kind === "ping";
        case "refreshed": return entry.kind === "refresh";
        case "joined": return entry.kind === "join" && entry.topic === frame.topic;
        case "left": return entry.kind === "leave" && entry.topic === frame.topic;
        case "published": return entry.kind === "publish" && entry.topic === frame.topic;
        case "members": return entry.kind === "presence" && entry.topic === frame.topic;
        case "error":
          if (frame.topic !== undefined) return entry.topic === frame.topic;
          return entry.topic === undefined ? entry.kind !== "ping" : frame.code === "unknown_type";
        default: return false;
      }
    };
    const pending = conn.pending;
    while (pending.length) {
      const entry = pending[0];
      if (answers(entry)) return pending.shift();
      if (!MAYBE_ANSWERED.has(entry.kind)) return null; // not an answer to anything pending
      pending.shift(); // an ack or a signal answered by nothing before a later answer: it succeeded
    }
    return null;
  }

  // ---- frames

  _frame(conn, text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this._emit("error", { code: "bad_frame", message: "the server sent a frame that is not JSON" });
      return;
    }
    switch (frame.type) {
      case "welcome":
        return this._welcome(conn, frame);
      case "notification":
        return typeof frame.topic === "string" ? this._topicMessage(frame) : this._notification(frame);
      case "unread":
        return this._setUnread(frame.count);
      case "refreshed":
        this._settle(conn, frame);
        this._scheduleRefresh(frame.expires_at);
        return this._emit("refreshed", { expires_at: frame.expires_at });
      case "resync":
        return this._emit("resync", { reason: "server" });
      case "pong":
        this._settle(conn, frame);
        return undefined;
      case "joined":
        this._settle(conn, frame);
        return this._joined(conn, frame);
      case "left":
        return this._left(conn, frame, frame.reason === undefined ? this._settle(conn, frame) : null);
      case "published":
      case "members":
        this._settle(conn, frame)?.resolve?.(frame);
        return undefined;
      case "presence":
        return this._emit("presence", frame);
      case "signal":
        return this._emit("signal", frame);
      case "error":
        return this._error(conn, frame);
      default:
        return undefined; // a frame type newer than this client
    }
  }

  _error(conn, frame) {
    const entry = this._settle(conn, frame);
    const payload = { code: frame.code, message: frame.message };
    if (frame.topic !== undefined) payload.topic = frame.topic;
    if (entry) {
      entry.reject?.(new NotifyError(frame.code, frame.message, frame.topic, frame.reason));
      if (entry.kind === "join") this._joinRefused(conn, entry.topic, frame);
    } else if (conn.kind === "sse" && typeof frame.topic === "string" && conn.topics.includes(frame.topic)) {
      this._joinRefused(conn, frame.topic, frame); // a topic the stream could not join
    }
    this._emit("error", payload);
  }

  _welcome(conn, frame) {
    conn.welcomed = true;
    clearTimeout(conn.connectTimer);
    this._attempt = 0;
    this._authFailures = 0;
    this._rejectedToken = null;
    if (conn.kind === "websocket") this._wsFailures = 0;
    else this._sseFailures = 0;
    this.connectionId = frame.connection_id;
    // With nothing of a stream seen yet, the server's cursor of that stream is where a reconnect
    // resumes it from (present only when this connection did not resume).
    if (typeof frame.cursor === "string") this.lastUserId ??= frame.cursor;
    if (typeof frame.broadcast_cursor === "string") this.lastBroadcastId ??= frame.broadcast_cursor;
    this._scheduleRefresh(frame.expires_at);
    this._setState("open");
    // Topics again, each from its own cursor (over SSE the stream joined them already).
    if (conn.kind === "websocket") for (const topic of this._topics.keys()) this._sendJoin(conn, topic);
    this._emit("welcome", { ...frame, transport: conn.kind, url: conn.url });
    if (frame.recovered === false) this._emit("resync", { reason: "not_recovered" });
  }

  _joined(conn, frame) {
    const topic = frame.topic;
    conn.joining.delete(topic);
    const state = this._topics.get(topic);
    if (!state) return; // left meanwhile: the `leave` sent since follows
    conn.joined.add(topic);
    if (!state.lastId && typeof frame.cursor === "string") state.lastId = frame.cursor;
    state.frame = frame;
    for (const waiter of state.waiters.splice(0)) waiter.resolve(frame);
    this._emit("joined", frame);
  }

  _left(conn, frame, entry) {
    const topic = frame.topic;
    conn.joined.delete(topic);
    conn.joining.delete(topic);
    if (frame.reason !== undefined) {
      // Taken out by the server: not joined again.
      const state = this._topics.get(topic);
      this._topics.delete(topic);
      if (state) {
        const error = new NotifyError(frame.reason, "removed from the topic by the server", topic);
        for (const waiter of state.waiters.splice(0)) waiter.reject(error);
      }
    }
    entry?.resolve?.(frame);
    this._emit("left", frame);
  }

  /** Whether a frame of a stream is new: not seen (by stream and id) and past the stream's cursor. */
  _fresh(stream, id, cursor) {
    const key = stream + "\n" + id;
    if (this._seen.has(key) || (cursor && compareIds(id, cursor) <= 0)) return false;
    this._seen.add(key);
    this._seenOrder.push(key);
    if (this._seenOrder.length > this.options.dedupe) this._seen.delete(this._seenOrder.shift());
    return true;
  }

  _notification(frame) {
    if (typeof frame.id !== "string") return;
    if (frame.broadcast) {
      if (!this._fresh("b", frame.id, this.lastBroadcastId)) return;
      this.lastBroadcastId = frame.id;
    } else {
      if (!this._fresh("u", frame.id, this.lastUserId)) return;
      this.lastUserId = frame.id;
      this._setUnread(this.unread + 1);
    }
    this._emit("notification", frame);
    if (!LIFECYCLE.has(frame.event)) this._emit(frame.event, frame);
  }

  _topicMessage(frame) {
    const state = this._topics.get(frame.topic);
    if (typeof frame.id !== "string" || !state) return; // a topic left meanwhile
    if (!this._fresh("t:" + frame.topic, frame.id, state.lastId)) return;
    state.lastId = frame.id;
    this._emit("message", frame);
    this._dispatch(this._topicHandlers.get(frame.topic), frame);
  }

  _setUnread(count) {
    if (typeof count !== "number") return;
    this.unread = count;
    this._emit("unread", count);
  }

  // ---- liveness: app-level pings on the socket; any frame counts as a sign of life

  _startPings(conn) {
    const { pingInterval } = this.options;
    conn.pingTimer = setInterval(() => {
      if (this._conn !== conn) return;
      this._request(conn, { type: "ping" }, { kind: "ping" });
      if (conn.pongTimer === undefined) {
        conn.pongTimer = setTimeout(() => this._lost(conn, 4000, "no answer to ping"), this.options.pongTimeout);
      }
    }, pingInterval);
  }

  _alive(conn) {
    if (conn.pongTimer !== undefined) clearTimeout(conn.pongTimer);
    conn.pongTimer = undefined;
  }

  _stopTimers(conn) {
    clearInterval(conn.pingTimer);
    clearTimeout(conn.pongTimer);
    clearTimeout(conn.connectTimer);
  }

  // ---- tokens

  async _currentToken() {
    const exp = this._token ? tokenExpiry(this._token) : null;
    const stale = !this._token || (exp !== null && exp * 1000 <= Date.now() + 1000);
    if (stale && this.options.getToken) this._token = await this.options.getToken();
    return this._token;
  }

  _scheduleRefresh(expiresAt) {
    clearTimeout(this._refreshTimer);
    if (typeof expiresAt !== "number") return;
    const left = expiresAt * 1000 - Date.now();
    const margin = Math.min(this.options.refreshMargin * 1000, left / 2);
    const wait = Math.max(0, left - margin);
    // A timer holds at most 2^31 - 1 ms (about 24.8 days; a longer one fires at once): step there.
    if (wait > MAX_TIMER) this._refreshTimer = setTimeout(() => this._scheduleRefresh(expiresAt), MAX_TIMER);
    else this._refreshTimer = setTimeout(() => this._refresh(), wait);
  }

  async _refresh() {
    if (!this.options.getToken) {
      this._emit("error", { code: "token_expiring", message: "the token expires soon: call setToken()" });
      return;
    }
    try {
      this._token = await this.options.getToken();
    } catch (err) {
      this._emit("error", { code: "token_unavailable", message: String(err && err.message || err) });
      this._refreshTimer = setTimeout(() => this._refresh(), 5000);
      return;
    }
    this._sendRefresh();
  }

  _sendRefresh() {
    const conn = this._conn;
    if (!conn || !conn.welcomed) return;
    if (conn.kind === "websocket") {
      this._request(conn, { type: "refresh", token: this._token }, { kind: "refresh" });
    } else {
      // SSE cannot refresh in place: reopen the stream with the new token; the cursors avoid gaps
      // and the dedupe avoids doubles.
      this._drop(1000, "token refresh");
      this._open();
    }
  }

  // ---- plumbing

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, transport: this.transport, url: this.url, attempt: this._attempt, ...extra });
  }

  _emit(event, payload) {
    this._dispatch(this._handlers.get(event), payload);
  }

  _dispatch(handlers, payload) {
    if (!handlers) return;
    for (const handler of [...handlers]) {
      try {
        handler(payload);
      } catch (err) {
        setTimeout(() => { throw err; }); // report without breaking the client
      }
    }
  }
}

export default NotifyClient;
