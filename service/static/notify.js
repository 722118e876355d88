// notify.js: the browser client of notify-service. A dependency-free ES module; no build step.
//
//   import { NotifyClient } from "/client/notify.js";
//   const client = new NotifyClient({ urls: ["https://a.example", "https://b.example"], getToken });
//   client.on("order.shipped", (n) => console.log(n.data));
//   client.on("unread", (count) => badge.textContent = String(count));
//   client.connect();
//
// It speaks the protocol in docs/protocol.md: WebSocket on /ws (Server-Sent Events on /events as
// the fallback), resume from the last id seen, app-level pings, token refresh before `exp`,
// reconnect with capped exponential backoff and full jitter, rotating through `urls`.

/**
 * @typedef {Object} Notification
 * @property {"notification"} type
 * @property {string} id         unique, only grows; opaque to clients
 * @property {string} event      the publisher's event name, e.g. "order.shipped"
 * @property {*} data            the publisher's JSON payload
 * @property {number} ts         publish time, unix milliseconds
 * @property {boolean} [broadcast] true for notifications sent to everyone
 */

/**
 * @typedef {Object} Welcome
 * @property {"welcome"} type
 * @property {string} user
 * @property {string} connection_id
 * @property {boolean} [recovered]  present when resuming: false means some notifications were lost
 * @property {number} expires_at     the token's `exp`, unix seconds
 * @property {Transport} transport
 * @property {string} url            base URL of the server this connection is on
 */

/** @typedef {"websocket" | "sse"} Transport */

/**
 * idle: not started; connecting: opening a connection; open: welcomed by a server;
 * reconnecting: waiting to retry; unauthorized: the token was refused, waiting for a new one
 * (`setToken`, or `getToken` giving another); closed: `close()` was called or the server closed
 * normally.
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
 * @property {string} [since]      resume after this notification id on the first connect
 * @property {number} [unread]     initial unread count (e.g. from GET /me/notifications)
 * @property {number} [minDelay=500]     backoff base, milliseconds
 * @property {number} [maxDelay=15000]   backoff cap, milliseconds
 * @property {number} [pingInterval=20000]  send {"type":"ping"} this often (milliseconds)
 * @property {number} [pongTimeout=10000]   no frame this long after a ping: the socket is dead
 * @property {number} [connectTimeout=10000] an attempt that is not welcomed in time fails
 * @property {number} [refreshMargin=60]  seconds before `exp` to refresh the token
 * @property {number} [sseAfter=3]  consecutive WebSocket failures before trying SSE ("auto")
 * @property {number} [dedupe=1000] how many recent ids are remembered to drop duplicates
 */

const LIFECYCLE = new Set([
  "notification", "state", "welcome", "unread", "error", "resync", "refreshed", "close",
]);
const MAX_AUTH_FAILURES = 3;

/** Compare two notification ids ("<ms>-<seq>"); ids from one service are totally ordered. */
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
      connectTimeout: 10000, refreshMargin: 60, sseAfter: 3, dedupe: 1000, ...options,
    };
    /** @type {State} */
    this.state = "idle";
    /** @type {Transport} */
    this.transport = this.options.transport === "sse" ? "sse" : "websocket";
    /** @type {number} unread notifications of this user (broadcasts do not count) */
    this.unread = options.unread ?? 0;
    /** @type {string | null} id of the connection the server gave in its welcome */
    this.connectionId = null;
    /** @type {string | null} the newest user-notification id seen */
    this.lastUserId = options.since ?? null;
    /** @type {string | null} the newest broadcast id seen */
    this.lastBroadcastId = options.since ?? null;

    this._token = options.token ?? null;
    this._rejectedToken = null;
    this._authFailures = 0;
    this._index = 0;
    this._attempt = 0;
    this._wsFailures = 0;
    this._sseFailures = 0;
    this._conn = null; // {kind, token, url, welcomed, send(frame), close(code, reason)}
    this._generation = 0;
    this._retryTimer = null;
    this._refreshTimer = null;
    this._seen = new Set();
    this._seenOrder = [];
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    this._onOnline = () => { if (this.state === "reconnecting") this.reconnect(); };
  }

  /** Base URL of the server in use (or about to be). */
  get url() {
    return this.urls[this._index];
  }

  /** The newest id seen on either stream. */
  get lastId() {
    const a = this.lastUserId, b = this.lastBroadcastId;
    if (!a || !b) return a || b;
    return compareIds(a, b) >= 0 ? a : b;
  }

  /**
   * Listen to a notification event name ("order.shipped"), to every notification ("notification"),
   * or to a lifecycle event: "state" (StateChange), "welcome" (Welcome), "unread" (count),
   * "error" ({code, message}), "resync" ({reason}: refetch the inbox), "refreshed" ({expires_at}),
   * "close" ({code, reason, transport, url}). Notifications whose event name is one of these are
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

  /** Start (or restart after `close()`). Safe to call twice. */
  connect() {
    if (this.state !== "idle" && this.state !== "closed" && this.state !== "unauthorized") return;
    if (typeof addEventListener === "function") addEventListener("online", this._onOnline);
    this._attempt = 0;
    this._authFailures = 0;
    this._open();
  }

  /** Stop for good (until `connect()`): no reconnect, no timers. */
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
   * After a 4401, this is what starts the client again.
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
   * Mark everything up to `id` (default: the newest notification seen) as read, on all the user's
   * devices. Over a WebSocket this is an `ack` frame; otherwise POST /me/notifications/read.
   * The server then sends the new count as an "unread" event.
   * @param {string} [id]
   * @returns {Promise<void>}
   */
  async ack(id) {
    const upTo = id ?? this.lastId;
    if (!upTo) return;
    const conn = this._conn;
    if (conn && conn.kind === "websocket" && conn.welcomed && conn.send({ type: "ack", id: upTo })) return;
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

  /** Resume cursors: one per stream on a socket; SSE takes one cursor for both (ids are ordered). */
  _cursorQuery(params) {
    if (this.transport === "sse") {
      if (this.lastId) params.set("since", this.lastId);
      return;
    }
    // Before any broadcast is seen, the user cursor stands in for it (and the other way round).
    const user = this.lastUserId ?? this.lastBroadcastId;
    const broadcast = this.lastBroadcastId ?? this.lastUserId;
    if (user) params.set("since", user);
    if (broadcast) params.set("broadcast_since", broadcast);
  }

  _openWebSocket(token) {
    const params = new URLSearchParams({ token });
    this._cursorQuery(params);
    const url = this.url.replace(/^http/, "ws") + "/ws?" + params;
    const conn = { kind: "websocket", token, welcomed: false, url: this.url, socket: null };
    let socket;
    try {
      socket = new globalThis.WebSocket(url);
    } catch (err) {
      queueMicrotask(() => this._lost(conn, 1006, String(err)));
      return Object.assign(conn, { close() {}, send: () => false });
    }
    conn.socket = socket;
    conn.send = (frame) => {
      if (socket.readyState !== 1) return false;
      socket.send(JSON.stringify(frame));
      return true;
    };
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
    this._cursorQuery(params);
    const conn = { kind: "sse", token, welcomed: false, url: this.url, source: null, send: () => false };
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
      // (next server, fresh cursor and token). A refused stream (401) looks the same as a dead one.
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
    this._stopTimers(conn);
    conn.close(code, reason);
    this._emit("close", { code, reason, transport: conn.kind, url: conn.url });
    if (!conn.welcomed && code !== 4401 && code !== 4029) {
      // Never welcomed: count towards the switch to the other transport ("auto").
      if (conn.kind === "websocket") this._wsFailures += 1;
      else this._sseFailures += 1;
    }
    if (code === 1000) {
      this._setState("closed", { code });
      return;
    }
    if (code === 4401) {
      this._unauthorized(conn);
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

  _unauthorized(conn) {
    this._rejectedToken = conn.token;
    this._authFailures += 1;
    if (this._token === conn.token) this._token = null;
    if (!this.options.getToken || this._authFailures > MAX_AUTH_FAILURES) {
      this._setState("unauthorized", { code: 4401 });
      return;
    }
    // getToken may give a new token; if it gives the refused one again, wait for setToken.
    this._scheduleRetry(undefined, 4401);
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
      this._stopTimers(conn);
      conn.close(code, reason);
    }
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
        return this._notification(frame);
      case "unread":
        return this._setUnread(frame.count);
      case "refreshed":
        this._scheduleRefresh(frame.expires_at);
        return this._emit("refreshed", { expires_at: frame.expires_at });
      case "resync":
        return this._emit("resync", { reason: "server" });
      case "error":
        return this._emit("error", { code: frame.code, message: frame.message });
      default:
        return undefined; // pong, or a frame type newer than this client
    }
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
    // With nothing seen yet, the server's cursor is where a reconnect resumes from.
    if (typeof frame.cursor === "string") {
      this.lastUserId ??= frame.cursor;
      this.lastBroadcastId ??= frame.cursor;
    }
    this._scheduleRefresh(frame.expires_at);
    this._setState("open");
    this._emit("welcome", { ...frame, transport: conn.kind, url: conn.url });
    if (frame.recovered === false) this._emit("resync", { reason: "not_recovered" });
  }

  _notification(frame) {
    if (typeof frame.id !== "string" || this._seen.has(frame.id)) return;
    this._seen.add(frame.id);
    this._seenOrder.push(frame.id);
    if (this._seenOrder.length > this.options.dedupe) this._seen.delete(this._seenOrder.shift());
    if (frame.broadcast) {
      if (!this.lastBroadcastId || compareIds(frame.id, this.lastBroadcastId) > 0) this.lastBroadcastId = frame.id;
    } else {
      if (!this.lastUserId || compareIds(frame.id, this.lastUserId) > 0) this.lastUserId = frame.id;
      this._setUnread(this.unread + 1);
    }
    this._emit("notification", frame);
    if (!LIFECYCLE.has(frame.event)) this._emit(frame.event, frame);
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
      conn.send({ type: "ping" });
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
    this._refreshTimer = setTimeout(() => this._refresh(), Math.max(0, left - margin));
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
      conn.send({ type: "refresh", token: this._token });
    } else {
      // SSE cannot refresh in place: reopen the stream with the new token; the cursor avoids gaps
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
    const handlers = this._handlers.get(event);
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
