// wshub.js: a browser client for wshub (decisions.md 17); docs/client.md tells how to use it.
// A plain ES module with no dependencies and no build step.
//
// Theory of operation. One WebSocket at a time. Every drop that is not a refusal
// (1000, 4400-4499) schedules a reconnect after a full-jitter delay; each reconnect
// carries the last position seen (?since=EPOCH:OFFSET&previous=OLD_ID) so that the
// server replays what was missed, and frames at or below the last offset emitted
// are dropped, so the app sees every offset of an epoch at most once, in order.

const ROOM = /^[A-Za-z0-9._~-]{1,64}$/;
// Names of our own events: a server frame of one of these types is ignored, so that a
// server can never fake a lifecycle event.
const OWN = { connecting: 1, open: 1, close: 1, reconnecting: 1, recovered: 1 };

/** Close codes after which the client does not reconnect: a normal close and
 *  "not without new credentials or a change on your side" (decisions.md 19). */
export const stopsOn = (code) => code === 1000 || (code >= 4400 && code <= 4499);

/** Full jitter: a uniform delay in [0, min(cap, base * 2^attempt)) ms. */
export const backoff = (attempt, base = 500, cap = 20000, random = Math.random) =>
  random() * Math.min(cap, base * 2 ** attempt);

// [exp, lead] in ms for a JWT: when it expires and how long before that to refresh it
// (a quarter of its lifetime, at most a minute); null when it carries no exp.
function tokenTimes(token, now) {
  try {
    const c = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    const exp = c.exp * 1000;
    if (!Number.isFinite(exp)) return null;
    const start = Number.isFinite(c.iat) ? c.iat * 1000 : now;
    return [exp, Math.min(60000, Math.max(0, exp - start) / 4)];
  } catch {
    return null;
  }
}

export class WshubClient {
  constructor(url = "/websocket", options = {}) {
    const o = (this.options = {
      base: 500,
      cap: 20000,
      resetAfter: 5000,
      connectTimeout: 10000,
      idleTimeout: 0,
      answerPings: true,
      ...options,
    });
    if (o.room != null && !ROOM.test(o.room)) throw new TypeError("wshub: bad room name");
    const u = new URL(url, globalThis.location?.href);
    u.protocol = u.protocol.replace(/^http/, "ws");
    if (o.room) u.pathname = u.pathname.replace(/\/?$/, "/" + o.room);
    this.url = u.href;
    this.state = "idle"; // idle | connecting | open | waiting | stopped
    this.id = this.epoch = this.offset = null;
    this._last = -Infinity; // the last offset emitted in this epoch
    const since = /^(.+):(\d+)$/.exec(o.since);
    if (since) {
      this.epoch = since[1];
      this._last = this.offset = +since[2];
    }
    this._on = {};
    this._attempt = this._seq = this._skew = 0;
    this._waits = { pong: [], user_info_response: [] };
    this._token = o.token;
    this._welcomed = false;
    globalThis.addEventListener?.("online", () => this.state === "waiting" && this._open());
  }

  /** "EPOCH:OFFSET" of the last frame seen (or of the welcome), null without history. */
  get position() {
    return this.epoch != null && this.offset != null ? this.epoch + ":" + this.offset : null;
  }

  on(type, fn) {
    (this._on[type] ||= new Set()).add(fn);
    return this;
  }

  off(type, fn) {
    this._on[type]?.delete(fn);
    return this;
  }

  _emit(type, data) {
    for (const fn of this._on[type] || []) {
      try {
        fn(data);
      } catch (e) {
        setTimeout(() => {
          throw e; // reported like any uncaught error; the other listeners still run
        });
      }
    }
  }

  /** Start (or restart after a stop); keeps the position, so a restart recovers. */
  connect() {
    if (this.state === "connecting" || this.state === "open") return this;
    this._stopped = false;
    this._open();
    return this;
  }

  /** Close with 1000 and stop reconnecting. */
  close(reason = "") {
    this._stopped = true;
    if (this._ws) this._ws.close(1000, reason);
    else if (this.state !== "stopped") {
      this._seq++; // forget a connect waiting for getToken()
      clearTimeout(this._retry);
      this._dropped(1000, reason);
    }
  }

  send(content) {
    return this._send({ type: "message", content });
  }

  broadcast(content) {
    return this._send({ type: "broadcast", content });
  }

  /** Resolves with the round trip in ms. */
  ping() {
    const at = performance.now();
    return this._ask({ type: "ping" }, "pong").then(() => performance.now() - at);
  }

  /** Resolves with the user_info_response. */
  userInfo() {
    return this._ask({ type: "user_info" }, "user_info_response");
  }

  _ask(frame, answer) {
    return new Promise((resolve, reject) => {
      if (!this._send(frame)) return reject(new Error("wshub: not connected"));
      this._waits[answer].push([resolve, reject]);
    });
  }

  // Sends are refused (false) unless the socket is open: a queue would deliver stale
  // text late, and a burst of it would trip the server's rate limit.
  _send(frame) {
    if (this.state !== "open") return false;
    this._ws.send(JSON.stringify(frame));
    return true;
  }

  _fresh(now) {
    const t = this._token && tokenTimes(this._token, now);
    return this._token && (!t || t[0] - t[1] > now);
  }

  async _open() {
    const o = this.options;
    const seq = ++this._seq;
    clearTimeout(this._retry);
    this.state = "connecting";
    this._emit("connecting", { attempt: this._attempt });
    try {
      if (o.getToken && !this._fresh(Date.now() + this._skew)) this._token = await o.getToken();
    } catch (e) {
      if (seq === this._seq) this._dropped(1006, "getToken: " + e);
      return;
    }
    if (seq !== this._seq) return;
    const u = new URL(this.url);
    const q = [];
    if (this.position) {
      q.push("since=" + encodeURIComponent(this.epoch) + ":" + this.offset);
      if (this.id) q.push("previous=" + encodeURIComponent(this.id));
    } else if (o.history && !this._welcomed) q.push("history=" + o.history);
    if (q.length) u.search = (u.search ? u.search + "&" : "?") + q.join("&");
    this._sentSince = !!this.position;
    let ws;
    try {
      ws = this._ws = new WebSocket(u, this._token ? ["wshub", "bearer." + this._token] : []);
    } catch (e) {
      // e.g. a token that cannot be a subprotocol: ask getToken() for another; a fixed
      // token stops here rather than be dropped (that would connect without it).
      if (o.getToken) this._token = null;
      else this._stopped = true;
      return this._dropped(1006, String(e));
    }
    this._timer = setTimeout(() => this._abandon(ws, "connect timeout"), o.connectTimeout);
    ws.onopen = () => {
      this.state = "open";
      this._openedAt = Date.now();
      this._alive(ws);
      this._emit("open", { protocol: ws.protocol });
    };
    ws.onmessage = (e) => this._frame(ws, e.data);
    ws.onclose = (e) => ws === this._ws && this._dropped(e.code, e.reason);
  }

  // A socket that went quiet may never report its close (a dead network): leave it.
  _abandon(ws, reason) {
    if (ws !== this._ws) return;
    ws.onclose = ws.onmessage = null;
    ws.close();
    this._dropped(1006, reason);
  }

  _alive(ws) {
    clearTimeout(this._timer);
    const t = this.options.idleTimeout;
    if (t) this._timer = setTimeout(() => this._abandon(ws, "idle timeout"), t);
  }

  _dropped(code, reason) {
    const o = this.options;
    this._ws = null;
    clearTimeout(this._timer);
    clearTimeout(this._refresh);
    for (const k in this._waits) {
      for (const [, reject] of this._waits[k].splice(0)) reject(new Error("wshub: closed"));
    }
    if (this._openedAt && Date.now() - this._openedAt >= o.resetAfter) this._attempt = 0;
    this._openedAt = 0;
    if (code === 4401 && o.getToken) this._token = null; // refused or expired: ask again
    const again = !this._stopped && !stopsOn(code);
    this.state = again ? "waiting" : "stopped";
    this._emit("close", { code, reason, reconnect: again });
    if (again) {
      const delay = backoff(this._attempt++, o.base, o.cap);
      this._emit("reconnecting", { attempt: this._attempt, delay });
      this._retry = setTimeout(() => this._open(), delay);
    }
  }

  _frame(ws, data) {
    if (ws !== this._ws) return;
    this._alive(ws);
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return;
    }
    const type = m?.type;
    if (typeof type !== "string" || OWN[type]) return;
    if (type === "welcome") return this._welcome(m);
    if ((type === "message" || type === "broadcast") && typeof m.offset === "number") {
      if (m.offset <= this._last) return; // a duplicate: already emitted
      this._last = this.offset = m.offset;
    }
    // A sign of life some proxies and older servers look for; the browser answers the
    // protocol-level Ping on its own.
    if (type === "ping" && this.options.answerPings) this._send({ type: "pong" });
    if (type === "refreshed" && this._next) {
      this._token = this._next;
      this._plan();
    }
    this._waits[type]?.shift()?.[0](m);
    this._emit(type, m);
  }

  _welcome(m) {
    const again = this._welcomed || this._sentSince;
    this._welcomed = true;
    this.id = m.connectionId;
    if (m.recovered !== true) {
      // A new start: offsets of a history replay (?history=N) lie at or below the
      // welcome's, so nothing is a duplicate until the first frame.
      this.epoch = m.epoch ?? null;
      this.offset = m.offset ?? null;
      this._last = -Infinity;
    }
    this._skew = Date.parse(m.timestamp) - Date.now() || 0; // the server's clock judges exp
    this._plan();
    this._emit("welcome", m);
    if (again) this._emit("recovered", { recovered: m.recovered === true, missed: m.missed ?? 0 });
  }

  // Refresh the token before it expires, by the server's clock. A refresh that is
  // refused (an error) or unanswered is tried again at half the time left.
  _plan(retry) {
    clearTimeout(this._refresh);
    const now = Date.now() + this._skew;
    const t = this.options.getToken && this._token && tokenTimes(this._token, now);
    if (!t) return;
    const wait = retry ? (t[0] - now) / 2 : t[0] - t[1] - now;
    if (wait > 50 || !retry) this._refresh = setTimeout(() => this._renew(), wait);
  }

  async _renew() {
    const seq = this._seq;
    this._plan(true);
    try {
      this._next = await this.options.getToken();
      if (seq === this._seq) this._send({ type: "refresh", token: this._next });
    } catch {}
  }
}
