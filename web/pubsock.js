// pubsock browser client: a dependency-free ES module (types in pubsock.d.ts).
//
// Served by every socket pod at /pubsock.js:
//
//   import { PubsockClient } from "/pubsock.js";
//   const client = new PubsockClient({ token, getToken: () => fetchTokenFromMyBackend() });
//   client.on("gap", ({ channel }) => reloadState(channel));
//   client.subscribe("room:1", (message) => show(message), { presence: true });
//   await client.connect();
//   await client.publish("room:1", { text: "hi" });
//
// What it guarantees to a handler: every message at most once (deduplicated by id per channel)
// and in the channel's order. It keeps the last position of every channel (a message `id`, or the
// `position` of a `subscribed` frame) and after every disconnect reconnects with exponential
// backoff and full jitter, resubscribing with `since`; the server then answers `recovered: true`
// and replays what was missed, or `recovered: false`, which this client reports as a `gap` event
// (the application reloads its state: nothing is ever silently missing).
//
// `subscribe(channel, handler, { rewind: { count: 50 } })` also hands the handler the channel's
// recent messages from the pod's history first (`count` and/or `seconds`). The rewind goes with
// every resubscribe; the server serves it on the first and after a gap (the handler then gets
// only what it had not seen), never when `since` recovers.
//
// Reconnect policy by close code:
//   1012 (server restarting, or the connection reached its maximum age): reconnect at once, once;
//        a second 1012 before the new connection was stable backs off like any other close.
//   1013 (too slow, flooding, overloaded), network errors, failed handshakes: backoff.
//   1008 (token expired): fetch a new token with getToken(), then reconnect with backoff.
// A browser cannot see why a handshake failed (401? 503?), so before every (re)connect a token that
// expires within `refreshMarginMs` is replaced, and after `tokenRefetchAfterFailures` failed
// handshakes in a row a new token is fetched anyway.
//
// Before each websocket, one plain HTTP request (GET /config.json of the socket service) lets a
// load balancer with cookie affinity set its cookie, so the upgrade lands on the same pod.
//
// Server-Sent Events: where websockets cannot connect (a proxy refuses the upgrade), the client
// falls back, after `sseFallbackAfter` failed handshakes in a row, to one EventSource (GET /sse)
// carrying every subscribed channel (browsers allow six HTTP/1.1 connections per host: one stream
// per client, one client per page). Publishing is HTTP either way. The stream is reopened with the
// new channel list, its positions in `last_event_id`, when subscriptions change or the token is
// refreshed; the same events (subscribed, recovered, gap, join, leave, pod) reach the
// application. The client reconnects the stream itself (same policy as above, close codes from
// the server's `close` event), never leaving it to the browser: a reconnect then carries a fresh
// token. `transport: "sse"` uses SSE from the start.
//
// Everything that touches the outside is injectable (WebSocket, EventSource, fetch, timers, clock,
// random), so the module runs unchanged under Node's test runner with fakes.

export const CLOSE_NORMAL = 1000;
export const CLOSE_TOKEN_EXPIRED = 1008;
export const CLOSE_RESTART = 1012;
export const CLOSE_TRY_AGAIN_LATER = 1013;
/** The code reported when the connection is lost without a close frame (or we drop it). */
export const CLOSE_ABNORMAL = 1006;

const WS_OPEN = 1;
const CHANNEL_RE = /^[A-Za-z0-9_.:@-]{1,128}$/;
const TRANSPORTS = ["auto", "websocket", "sse"];
const SSE_EVENTS = ["subscribed", "join", "leave", "pod", "close"];

const DEFAULTS = {
  backoffBaseMs: 500,
  backoffMaxMs: 30000,
  refreshMarginMs: 60000,
  pingIntervalMs: 25000,
  pongTimeoutMs: 10000,
  connectTimeoutMs: 10000,
  warmupTimeoutMs: 5000,
  stableAfterMs: 5000,
  dedupeSize: 1000,
  publishRetries: 5,
  presenceTimeoutMs: 5000,
  tokenRefetchAfterFailures: 3,
  sseFallbackAfter: 2,
};

/**
 * The positions in an SSE stream's event id (`<channel>=<position>,...`, docs/protocol.md):
 * a Map channel -> position, or null when the id is not such a list.
 */
export function parseEventId(id) {
  if (typeof id !== "string" || id === "") return null;
  const positions = new Map();
  for (const pair of id.split(",")) {
    const at = pair.indexOf("=");
    if (at <= 0 || at === pair.length - 1) return null;
    positions.set(pair.slice(0, at), pair.slice(at + 1));
  }
  return positions;
}

/** An SSE event id from [channel, position] pairs (what `last_event_id` carries). */
export function formatEventId(pairs) {
  return pairs.map(([channel, position]) => `${channel}=${position}`).join(",");
}

/** Decodes the payload of a JWT (base64url JSON) without verifying it; null when malformed. */
export function decodeJwtPayload(token) {
  if (typeof token !== "string") return null;
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) b64 += "=";
    const binary = atob(b64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const payload = JSON.parse(new TextDecoder().decode(bytes));
    return payload && typeof payload === "object" ? payload : null;
  } catch {
    return null;
  }
}

/** The `exp` of a JWT in milliseconds since the epoch, or null. */
export function tokenExpiryMs(token) {
  const payload = decodeJwtPayload(token);
  return payload && typeof payload.exp === "number" ? payload.exp * 1000 : null;
}

/** Exponential backoff with full jitter: uniform in [0, min(maxMs, baseMs * 2^attempt)). */
export function fullJitter(attempt, baseMs, maxMs, random = Math.random) {
  const cap = Math.min(maxMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** A publish the API refused (4xx) or that still failed after every retry. */
export class PublishError extends Error {
  constructor(message, { status = 0, detail = null, id = null, retryAfterMs = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "PublishError";
    this.status = status;
    this.detail = detail;
    this.id = id;
    this.retryAfterMs = retryAfterMs;
  }
}

/** An `error` frame (or a local failure) that concerns one request: a subscribe or a query. */
export class PubsockError extends Error {
  constructor(code, message, channel = null) {
    super(message);
    this.name = "PubsockError";
    this.code = code;
    this.channel = channel;
  }
}

function newMessageId() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < 16; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function defaultSocketUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) return null;
  return `${loc.protocol === "https:" ? "wss" : "ws"}://${loc.host}/ws`;
}

/** The http(s) URL of `path` on the pod behind a websocket URL (`path` alone if unparsable). */
function httpUrlFor(wsUrl, path) {
  try {
    const url = new URL(wsUrl);
    url.protocol = url.protocol === "wss:" ? "https:" : "http:";
    url.pathname = path;
    url.search = "";
    url.hash = "";
    return url.toString();
  } catch {
    return path;
  }
}

function sseUrlFor(wsUrl) {
  return httpUrlFor(wsUrl, "/sse");
}

function presenceUrlFor(sseUrl) {
  const base = globalThis.location?.href;
  try {
    const url = base ? new URL(sseUrl, base) : new URL(sseUrl);
    url.pathname = `${url.pathname.replace(/\/+$/, "")}/presence`;
    url.search = "";
    return url.toString();
  } catch {
    return `${sseUrl.replace(/\/+$/, "")}/presence`;
  }
}

function configUrlFor(wsUrl) {
  return httpUrlFor(wsUrl, "/config.json");
}

function swallow(promise) {
  promise.catch(() => {}); // callers may ignore it: never an unhandled rejection
  return promise;
}

export class PubsockClient extends EventTarget {
  /** @param {import("./pubsock.js").PubsockOptions} [options] */
  constructor(options = {}) {
    super();
    const url = options.url ?? defaultSocketUrl();
    if (!url) throw new TypeError("PubsockClient: options.url is required outside a browser");
    this.url = url;
    this.apiBase = (options.apiBase ?? "").replace(/\/+$/, "");
    this.configUrl = options.configUrl === undefined ? configUrlFor(url) : options.configUrl;
    this.options = { ...DEFAULTS };
    for (const key of Object.keys(DEFAULTS)) {
      if (options[key] !== undefined) this.options[key] = options[key];
    }
    this.sseUrl = options.sseUrl ?? sseUrlFor(url);
    const transport = options.transport ?? "auto";
    if (!TRANSPORTS.includes(transport)) {
      throw new TypeError(`PubsockClient: transport must be one of ${TRANSPORTS.join(", ")}`);
    }
    this._getToken = options.getToken ?? null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    // null: no SSE (an explicit null is kept, so tests can turn the fallback off)
    this._EventSource = options.EventSource !== undefined ? options.EventSource : globalThis.EventSource;
    this._transportOption = transport;
    // "websocket" or "sse": what the client uses now (auto starts with websockets if it can).
    this._mode = transport === "sse" || (transport === "auto" && !this._WebSocket) ? "sse" : "websocket";
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this._setTimeout = options.setTimeout ?? globalThis.setTimeout.bind(globalThis);
    this._clearTimeout = options.clearTimeout ?? globalThis.clearTimeout.bind(globalThis);
    this._now = options.now ?? (() => Date.now());
    this._random = options.random ?? Math.random;

    this._token = null;
    this._tokenExpMs = null;
    this._setTokenValue(options.token ?? null);
    this._forceToken = false;
    this._pendingRefresh = null;
    // The token the open connection holds on the server (the one it opened with, or the last
    // refresh the server confirmed). `_token` may be newer: publish() fetches one when it is near
    // expiry, without telling the connection.
    this._socketToken = null;
    this._socketExpMs = null;

    /** channel -> subscription state */
    this._channels = new Map();
    this._pendingUnsubscribes = new Map(); // channel -> unsubscribe frames not yet answered
    this._presenceWaiters = new Map(); // channel -> [{resolve, reject, timer}]

    this._ws = null;
    this._es = null; // the EventSource in SSE mode
    this._wsFailures = 0; // websocket handshakes failed in a row (the SSE fallback counts them)
    this._opened = false;
    this._refusal = null; // the last refusal reported (_diagnoseStream)
    this._generation = 0;
    this._running = false;
    this._state = "closed";
    this._pod = null;
    this._podAnnounced = false;
    this._attempt = 0;
    this._fastReconnects = 0;
    this._handshakeFailures = 0;
    this._lastFrameAt = 0;
    this._timers = {};
    this._openWaiters = [];
    this._onOnline = () => {
      if (!this._running) return;
      if (this._timers.reconnect !== undefined) this._startConnecting();
      else if (this._mode === "sse") this._streamChanged(); // the old stream may be dead
    };
  }

  // -- public API ------------------------------------------------------------------------

  /** "connecting", "open" or "closed". */
  get state() {
    return this._state;
  }

  /** "websocket" or "sse": the transport in use (or tried next). */
  get transport() {
    return this._mode;
  }

  /** The pod that serves this client (from the last pong, or the warm-up response). */
  get pod() {
    return this._pod;
  }

  /** The current client token (null when none). */
  get token() {
    return this._token;
  }

  /** Listens to an event; the listener gets the event's detail. Returns a function that stops. */
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  /** Starts connecting (and reconnecting, until close()); resolves once the socket is open. */
  connect() {
    if (this._state === "open") return Promise.resolve();
    const waiter = swallow(
      new Promise((resolve, reject) => this._openWaiters.push({ resolve, reject })),
    );
    if (!this._running) {
      this._running = true;
      this._attempt = 0;
      this._fastReconnects = 0;
      this._handshakeFailures = 0;
      if (typeof globalThis.addEventListener === "function") {
        globalThis.addEventListener("online", this._onOnline);
      }
      this._startConnecting();
    }
    return waiter;
  }

  /** Closes the connection for good (no reconnect). Subscriptions are kept for a later connect(). */
  close() {
    this._running = false;
    this._generation++;
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    this._clearTimer("reconnect");
    const ws = this._ws;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(CLOSE_NORMAL);
      } catch {
        /* already closing */
      }
    }
    this._connectionEnded(); // closes the EventSource too
    const waiters = this._openWaiters.splice(0);
    for (const w of waiters) w.reject(new PubsockError("closed", "client closed"));
    if (this._state !== "closed") this._setState("closed", { code: CLOSE_NORMAL, reason: "closed by client" });
  }

  /**
   * Subscribes `handler(message)` to `channel` (replacing an earlier handler of that channel).
   * Resolves with the `subscribed` frame; rejects when the server refuses the subscription
   * (then it is dropped). Resumes after every reconnect with `since`.
   */
  subscribe(channel, handler, { since = null, presence = false, rewind = null } = {}) {
    if (typeof handler !== "function") throw new TypeError("subscribe: handler must be a function");
    let entry = this._channels.get(channel);
    const resend = !entry || entry.presence !== presence || (since !== null && since !== entry.position);
    if (!entry) {
      entry = {
        channel,
        handler,
        presence,
        position: since,
        sentSince: null,
        pendingPosition: null,
        active: false,
        seen: new Set(),
        waiters: [],
      };
      this._channels.set(channel, entry);
    } else {
      entry.handler = handler;
      entry.presence = presence;
      if (since !== null) entry.position = since;
    }
    // For the next (re)subscribe; a subscription already running keeps what it has.
    entry.rewind = rewind ? { ...rewind } : null;
    if (!resend && entry.active) {
      return Promise.resolve({ type: "subscribed", channel, position: entry.position });
    }
    const promise = swallow(
      new Promise((resolve, reject) => entry.waiters.push({ resolve, reject })),
    );
    if (resend && this._isOpen()) {
      this._sendSubscribe(entry);
      if (entry.sentSince || entry.rewind) this._send({ type: "ping" }); // its pong ends the replay
    } else if (resend) {
      this._streamChanged();
    }
    return promise;
  }

  /** Stops delivery of `channel` and forgets its position. */
  unsubscribe(channel) {
    const entry = this._channels.get(channel);
    if (!entry) return;
    this._channels.delete(channel);
    for (const w of entry.waiters.splice(0)) {
      w.reject(new PubsockError("unsubscribed", "unsubscribed", channel));
    }
    if (this._isOpen() && this._send({ type: "unsubscribe", channel })) {
      this._pendingUnsubscribes.set(channel, (this._pendingUnsubscribes.get(channel) ?? 0) + 1);
    }
    this._streamChanged();
  }

  /** Channels this client is subscribed to (or will subscribe to when connected). */
  channels() {
    return [...this._channels.keys()];
  }

  /** The last position seen on `channel` (what the next resubscribe sends as `since`). */
  position(channel) {
    return this._channels.get(channel)?.position ?? null;
  }

  /** Asks who is on `channel` now (all pods). Resolves with the `presence` frame. */
  presence(channel, { timeoutMs = this.options.presenceTimeoutMs } = {}) {
    if (this._mode === "sse") return swallow(this._presenceOverHttp(channel, timeoutMs));
    if (!this._isOpen()) {
      return swallow(Promise.reject(new PubsockError("not_connected", "not connected", channel)));
    }
    const promise = swallow(
      new Promise((resolve, reject) => {
        const waiter = { resolve, reject, timer: undefined };
        waiter.timer = this._setTimeout(() => {
          const list = this._presenceWaiters.get(channel) ?? [];
          const i = list.indexOf(waiter);
          if (i >= 0) list.splice(i, 1);
          reject(new PubsockError("timeout", "no presence answer", channel));
        }, timeoutMs);
        const list = this._presenceWaiters.get(channel) ?? [];
        list.push(waiter);
        this._presenceWaiters.set(channel, list);
      }),
    );
    this._send({ type: "presence", channel });
    return promise;
  }

  /** Replaces the token (e.g. the application got a fresh one); sent as `refresh` when open. */
  setToken(token) {
    if (this._isOpen() && token && token !== this._socketToken) {
      this._pendingRefresh = token;
      this._send({ type: "refresh", token });
    } else {
      this._setTokenValue(token);
      if (this._mode === "sse" && token && token !== this._socketToken) this._streamChanged();
    }
  }

  /**
   * Publishes through the HTTP API; resolves to {id, channel} once the API answered 202 (the
   * message is durable). 5xx answers and network errors are retried with the same id (delivered
   * once), honouring Retry-After; a 401 fetches a new token once; other 4xx throw a PublishError.
   */
  async publish(channel, data, { id = newMessageId(), retries = this.options.publishRetries, signal } = {}) {
    const path = CHANNEL_RE.test(channel) ? channel : encodeURIComponent(channel);
    const url = `${this.apiBase}/v1/channels/${path}/messages`;
    let refetched = false;
    for (let attempt = 0; ; attempt++) {
      const token = await this._tokenForHttp();
      const headers = { "Content-Type": "application/json" };
      if (token) headers.Authorization = `Bearer ${token}`;
      let response;
      try {
        response = await this._fetch(url, {
          method: "POST",
          headers,
          body: JSON.stringify({ data, id }),
          signal,
        });
      } catch (error) {
        if (signal?.aborted || attempt >= retries) {
          throw new PublishError(`publish failed: ${error}`, { id, cause: error });
        }
        await this._sleep(fullJitter(attempt, this.options.backoffBaseMs, this.options.backoffMaxMs, this._random));
        continue;
      }
      const body = await response.json().catch(() => null);
      if (response.status >= 200 && response.status < 300) {
        return { id: body?.id ?? id, channel: body?.channel ?? channel };
      }
      if (body && typeof body.id === "string") id = body.id; // a 503 names the id to retry with
      const retryAfterMs = retryAfter(response);
      if (response.status === 401 && this._getToken && !refetched) {
        refetched = true;
        attempt--;
        this._setTokenValue(await this._getToken());
        continue;
      }
      if (response.status >= 500 && attempt < retries) {
        const jitter = fullJitter(attempt, this.options.backoffBaseMs, this.options.backoffMaxMs, this._random);
        await this._sleep(Math.min(Math.max(retryAfterMs ?? 0, jitter), this.options.backoffMaxMs));
        continue;
      }
      const detail = body?.detail ?? null;
      throw new PublishError(`publish failed: ${response.status} ${detail === null ? "" : JSON.stringify(detail)}`.trim(), {
        status: response.status,
        detail,
        id,
        retryAfterMs,
      });
    }
  }

  // -- connection lifecycle ----------------------------------------------------------------

  _startConnecting() {
    this._clearTimer("reconnect");
    const generation = ++this._generation;
    this._setState("connecting");
    this._prepare(generation).catch((error) => {
      if (generation !== this._generation) return;
      this._emit("error", { code: "client", message: String(error), error });
      this._scheduleReconnect(CLOSE_ABNORMAL, "client error");
    });
  }

  async _prepare(generation) {
    if (this._getToken && this._tokenNeedsRefresh()) {
      let token;
      try {
        token = await this._getToken();
      } catch (error) {
        if (generation !== this._generation) return;
        this._emit("error", { code: "token", message: `getToken failed: ${error}`, error });
        this._setState("closed", { code: CLOSE_ABNORMAL, reason: "no token" });
        this._scheduleReconnect(CLOSE_ABNORMAL, "no token");
        return;
      }
      if (generation !== this._generation) return;
      this._setTokenValue(token);
      this._forceToken = false;
    }
    if (this.configUrl) await this._warmUp(generation);
    if (generation !== this._generation) return;
    if (this._mode === "sse") this._openStream();
    else this._openSocket();
  }

  /** A plain request to the socket service first: the load balancer sets its affinity cookie. */
  async _warmUp(generation) {
    let timer;
    try {
      const timeout = new Promise((resolve) => {
        timer = this._setTimeout(() => resolve(null), this.options.warmupTimeoutMs);
      });
      const request = this._fetch(this.configUrl, { credentials: "include", cache: "no-store" });
      const response = await Promise.race([request, timeout]);
      if (!response || generation !== this._generation) return;
      const pod = response.headers?.get?.("X-Pubsock-Pod");
      if (pod && !this._podAnnounced) this._setPod(pod, "http");
    } catch {
      /* the websocket attempt reports any failure */
    } finally {
      this._clearTimeout(timer);
    }
  }

  _openSocket() {
    const url = this._token
      ? `${this.url}${this.url.includes("?") ? "&" : "?"}token=${encodeURIComponent(this._token)}`
      : this.url;
    this._socketToken = this._token;
    this._socketExpMs = this._tokenExpMs;
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (error) {
      this._emit("error", { code: "client", message: `cannot open websocket: ${error}`, error });
      this._setState("closed", { code: CLOSE_ABNORMAL, reason: String(error) });
      this._scheduleReconnect(CLOSE_ABNORMAL, String(error));
      return;
    }
    this._ws = ws;
    this._opened = false;
    ws.onopen = () => {
      if (this._ws === ws) this._onOpen();
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onData(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) this._onSocketClosed(event?.code ?? CLOSE_ABNORMAL, event?.reason ?? "");
    };
    ws.onerror = () => {}; // a close event follows
    this._timers.connect = this._setTimeout(() => {
      if (this._ws === ws && !this._opened) this._drop(ws, "connect timeout");
    }, this.options.connectTimeoutMs);
  }

  _onOpen() {
    this._clearTimer("connect");
    this._opened = true;
    this._handshakeFailures = 0;
    this._wsFailures = 0;
    this._podAnnounced = false;
    this._lastFrameAt = this._now();
    this._setState("open");
    for (const entry of this._channels.values()) this._sendSubscribe(entry);
    this._send({ type: "ping" }); // names the pod; its pong also ends every replay above
    this._armHeartbeat();
    this._scheduleRefresh(this._socketExpMs);
    this._timers.stable = this._setTimeout(() => {
      this._attempt = 0;
      this._fastReconnects = 0;
    }, this.options.stableAfterMs);
    for (const w of this._openWaiters.splice(0)) w.resolve();
  }

  /** Closes a socket we gave up on (no pong, connect timeout) and handles it as lost. */
  _drop(ws, reason) {
    this._detach(ws);
    try {
      ws.close(CLOSE_NORMAL);
    } catch {
      /* already closing */
    }
    this._onSocketClosed(CLOSE_ABNORMAL, reason);
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = null;
    ws.onerror = () => {};
    if (this._ws === ws) this._ws = null;
  }

  /** Clears what belongs to one connection. */
  _connectionEnded() {
    for (const name of ["connect", "ping", "pong", "refresh", "stable", "restart"]) this._clearTimer(name);
    this._ws = null;
    if (this._es) {
      this._detachStream(this._es);
      this._es = null;
    }
    for (const entry of this._channels.values()) {
      entry.active = false;
      entry.quiet = false;
      entry.pendingPosition = null; // the replay may not be complete: keep `since`
    }
    this._pendingUnsubscribes.clear();
    if (this._pendingRefresh) {
      // Never confirmed nor refused: it is fresher than the old one, use it for the reconnect.
      this._setTokenValue(this._pendingRefresh);
      this._pendingRefresh = null;
    }
    for (const [channel, waiters] of this._presenceWaiters) {
      for (const w of waiters) {
        this._clearTimeout(w.timer);
        w.reject(new PubsockError("not_connected", "connection lost", channel));
      }
    }
    this._presenceWaiters.clear();
  }

  _onSocketClosed(code, reason) {
    const wasOpen = this._opened;
    if (this._ws) this._detach(this._ws);
    this._opened = false;
    this._connectionEnded();
    this._setState("closed", { code, reason });
    if (!this._running) return;
    if (!wasOpen) {
      this._handshakeFailures++;
      if (this._handshakeFailures >= this.options.tokenRefetchAfterFailures) this._forceToken = true;
      if (this._mode === "websocket" && this._transportOption === "auto") {
        this._wsFailures++;
        if (this._wsFailures >= this.options.sseFallbackAfter && this._EventSource) {
          this._mode = "sse";
          this._handshakeFailures = 0;
          this._emit("transport", {
            transport: "sse",
            reason: `the websocket failed ${this._wsFailures} times in a row`,
          });
        }
      }
    }
    this._scheduleReconnect(code, reason);
  }

  _scheduleReconnect(code, reason) {
    if (!this._running) return;
    let delay;
    if (code === CLOSE_RESTART && this._fastReconnects < 1) {
      this._fastReconnects++;
      delay = 0;
    } else {
      delay = fullJitter(this._attempt++, this.options.backoffBaseMs, this.options.backoffMaxMs, this._random);
    }
    if (code === CLOSE_TOKEN_EXPIRED) this._forceToken = true;
    this._emit("reconnecting", { code, reason, delay, attempt: this._attempt });
    this._clearTimer("reconnect");
    this._timers.reconnect = this._setTimeout(() => {
      this._timers.reconnect = undefined;
      if (this._running) this._startConnecting();
    }, delay);
  }

  // -- Server-Sent Events ------------------------------------------------------------------

  /** Opens the one stream of this client: every channel, positions in `last_event_id`. */
  _openStream() {
    this._socketToken = this._token;
    this._socketExpMs = this._tokenExpMs;
    const entries = [...this._channels.values()];
    for (const entry of entries) {
      entry.sentSince = entry.position ?? null;
      entry.active = false;
      entry.pendingPosition = null;
    }
    if (entries.length === 0) {
      this._streamOpened(); // nothing to stream until a subscribe
      return;
    }
    const params = new URLSearchParams();
    params.set("channels", entries.map((e) => e.channel).join(","));
    const presence = entries.filter((e) => e.presence).map((e) => e.channel);
    if (presence.length) params.set("presence", presence.join(","));
    const positions = entries.filter((e) => e.position).map((e) => [e.channel, e.position]);
    if (positions.length) params.set("last_event_id", formatEventId(positions));
    // One rewind for the stream, on the channels that ask for one (the largest of their asks);
    // the server serves it only where a channel starts afresh or cannot resume.
    const rewinding = entries.filter((e) => e.rewind);
    if (rewinding.length) {
      for (const key of ["count", "seconds"]) {
        const bound = Math.max(0, ...rewinding.map((e) => e.rewind[key] ?? 0));
        if (bound > 0) params.set(`rewind_${key}`, String(bound));
      }
      if (rewinding.length < entries.length) {
        params.set("rewind_channels", rewinding.map((e) => e.channel).join(","));
      }
    }
    if (this._token) params.set("token", this._token);
    const url = `${this.sseUrl}${this.sseUrl.includes("?") ? "&" : "?"}${params}`;
    let es;
    try {
      es = new this._EventSource(url, { withCredentials: true });
    } catch (error) {
      this._emit("error", { code: "client", message: `cannot open the event stream: ${error}`, error });
      this._setState("closed", { code: CLOSE_ABNORMAL, reason: String(error) });
      this._scheduleReconnect(CLOSE_ABNORMAL, String(error));
      return;
    }
    this._es = es;
    this._opened = false;
    const handle = (event) => {
      if (this._es !== es) return;
      this._onData(event.data);
      this._adoptEventId(event.lastEventId);
    };
    es.onopen = () => {
      if (this._es === es) this._streamOpened();
    };
    es.onmessage = handle;
    for (const type of SSE_EVENTS) es.addEventListener(type, handle);
    // The response ended or failed: the client reconnects (with a fresh token), not the browser.
    es.onerror = () => {
      if (this._es !== es) return;
      if (!this._opened) swallow(this._diagnoseStream(url));
      this._streamLost(es, CLOSE_ABNORMAL, "event stream lost");
    };
    this._timers.connect = this._setTimeout(() => {
      if (this._es === es && !this._opened) this._streamLost(es, CLOSE_ABNORMAL, "connect timeout");
    }, this.options.connectTimeoutMs);
  }

  /**
   * A stream that never opened: EventSource hides the status, so the same request goes once over
   * fetch. A refusal that will repeat (400: channels invalid, too many or too long to resume;
   * 403: not allowed) is reported as an `error` {code: "refused", status, message: the server's
   * reason}, and the subscribes waiting for the stream reject with it. Reconnects go on (with
   * backoff): unsubscribing the channel at fault, or a new token, lets the stream open.
   */
  async _diagnoseStream(url) {
    if (!this._fetch) return;
    const aborter = typeof AbortController === "function" ? new AbortController() : null;
    let response;
    try {
      response = await this._fetch(url, {
        headers: { Accept: "text/event-stream" },
        credentials: "include",
        cache: "no-store",
        signal: aborter?.signal,
      });
    } catch {
      return; // the network: nothing to report
    }
    const status = response.status;
    let message = `the event stream was refused with HTTP ${status}`;
    if (status === 400 || status === 403) {
      try {
        const body = await response.json();
        if (typeof body?.detail === "string") message = body.detail;
      } catch {
        /* not JSON: keep the status */
      }
    }
    aborter?.abort(); // a stream that would open now is not this client's to keep
    if ((status !== 400 && status !== 403) || !this._running || this._opened) return;
    if (message === this._refusal) return; // said once per streak of failures
    this._refusal = message;
    const error = new PubsockError("refused", message);
    this._emit("error", { code: "refused", status, message });
    for (const entry of this._channels.values()) {
      for (const waiter of entry.waiters.splice(0)) waiter.reject(error);
    }
  }

  _streamOpened() {
    this._refusal = null;
    this._clearTimer("connect");
    this._opened = true;
    this._handshakeFailures = 0;
    this._lastFrameAt = this._now();
    if (this._state !== "open") {
      this._podAnnounced = false; // a new connection, not a reopen for new channels
      this._setState("open");
    }
    this._scheduleRefresh(this._socketExpMs);
    if (this._timers.stable === undefined) {
      this._timers.stable = this._setTimeout(() => {
        this._timers.stable = undefined;
        this._attempt = 0;
        this._fastReconnects = 0;
      }, this.options.stableAfterMs);
    }
    for (const w of this._openWaiters.splice(0)) w.resolve();
  }

  _detachStream(es) {
    es.onopen = es.onmessage = es.onerror = null;
    try {
      es.close();
    } catch {
      /* already closed */
    }
    if (this._es === es) this._es = null;
  }

  _streamLost(es, code, reason) {
    this._detachStream(es);
    this._onSocketClosed(code, reason);
  }

  /** The server's `close` event: it ends the stream; reconnect as for that websocket code. */
  _onStreamClose(frame) {
    const es = this._es;
    if (!es) return;
    const code = typeof frame.code === "number" ? frame.code : CLOSE_ABNORMAL;
    this._streamLost(es, code, typeof frame.reason === "string" ? frame.reason : "");
  }

  /** Subscriptions or the token changed: reopen the stream soon (one reopen for a burst). */
  _streamChanged() {
    if (this._mode !== "sse" || !this._running || this._timers.restart !== undefined) return;
    if (!this._opened && !this._es) return; // connecting: the next stream has the new list
    this._timers.restart = this._setTimeout(() => {
      this._timers.restart = undefined;
      this._restartStream();
    }, 0);
  }

  /** Replaces the stream by one with the current channels and token, resuming every channel
   * from its position: nothing is missed or repeated, and the application hears of it only
   * through the new channels' `subscribed` (and any `gap`). */
  _restartStream() {
    if (this._mode !== "sse" || !this._running || (!this._opened && !this._es)) return;
    if (this._es) this._detachStream(this._es);
    this._clearTimer("connect");
    this._clearTimer("refresh");
    for (const entry of this._channels.values()) entry.quiet = entry.active;
    this._openStream();
  }

  /** Every event's id says where each channel of the stream stands: those are the positions. */
  _adoptEventId(id) {
    const positions = parseEventId(id);
    if (!positions) return;
    for (const [channel, position] of positions) {
      const entry = this._channels.get(channel);
      if (entry && entry.active) {
        entry.position = position;
        entry.pendingPosition = null;
      }
    }
  }

  /** GET /sse/presence: the presence query of a client without a websocket. */
  async _presenceOverHttp(channel, timeoutMs) {
    const token = await this._tokenForHttp();
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const url = `${presenceUrlFor(this.sseUrl)}?channel=${encodeURIComponent(channel)}`;
    let timer;
    const timeout = new Promise((resolve) => {
      timer = this._setTimeout(() => resolve(null), timeoutMs);
    });
    let response;
    try {
      response = await Promise.race([this._fetch(url, { headers, cache: "no-store" }), timeout]);
    } catch (error) {
      throw new PubsockError("not_connected", `presence query failed: ${error}`, channel);
    } finally {
      this._clearTimeout(timer);
    }
    if (!response) throw new PubsockError("timeout", "no presence answer", channel);
    const body = await response.json().catch(() => null);
    if (response.status !== 200 || !body) {
      const code = { 400: "bad_channel", 401: "unauthorized", 403: "forbidden" }[response.status] ?? "error";
      throw new PubsockError(code, body?.detail ?? `HTTP ${response.status}`, channel);
    }
    this._emit("presence", body);
    return body;
  }

  _armHeartbeat() {
    this._clearTimer("ping");
    this._timers.ping = this._setTimeout(() => {
      const ws = this._ws;
      if (!ws || !this._opened) return;
      const sentAt = this._now();
      this._send({ type: "ping" });
      this._timers.pong = this._setTimeout(() => {
        if (this._ws === ws && this._lastFrameAt < sentAt) this._drop(ws, "no pong");
      }, this.options.pongTimeoutMs);
      this._armHeartbeat();
    }, this.options.pingIntervalMs);
  }

  // -- tokens ------------------------------------------------------------------------------

  _setTokenValue(token) {
    this._token = token || null;
    this._tokenExpMs = tokenExpiryMs(this._token);
  }

  _tokenNeedsRefresh() {
    if (!this._token || this._forceToken) return true;
    return this._tokenExpMs !== null && this._tokenExpMs - this._now() <= this.options.refreshMarginMs;
  }

  async _tokenForHttp() {
    if (this._getToken && this._tokenNeedsRefresh()) {
      try {
        this._setTokenValue(await this._getToken());
        this._forceToken = false;
      } catch {
        /* use what we have; the API answers 401 if it is not good */
      }
    }
    return this._token;
  }

  /** Sends `refresh` some margin before expiry (half the remaining time for short tokens). */
  _scheduleRefresh(expMs) {
    this._clearTimer("refresh");
    if (!this._getToken || !expMs || !this._opened) return;
    const remaining = expMs - this._now();
    const margin = this.options.refreshMarginMs;
    if (remaining <= 1000) return; // too late: the server closes with 1008 and we reconnect
    const delay = Math.max(1000, remaining > 2 * margin ? remaining - margin : remaining / 2);
    this._timers.refresh = this._setTimeout(() => {
      this._timers.refresh = undefined;
      this._refresh();
    }, delay);
  }

  async _refresh() {
    const ws = this._ws;
    let token;
    try {
      token = await this._getToken();
    } catch (error) {
      this._emit("error", { code: "token", message: `getToken failed: ${error}`, error });
      if (this._ws === ws) this._scheduleRefresh(this._socketExpMs);
      return;
    }
    if (this._mode === "sse") {
      if (!this._opened) {
        if (token) this._setTokenValue(token); // for the next stream
      } else if (!token || token === this._socketToken) {
        this._scheduleRefresh(this._socketExpMs); // nothing newer yet: ask again later
      } else {
        // A stream's token is in its URL: reopen it with the new one, resuming every channel.
        this._setTokenValue(token);
        this._emit("refreshed", { expires_at: Math.floor((this._tokenExpMs ?? 0) / 1000) });
        this._restartStream();
      }
      return;
    }
    if (this._ws !== ws || !this._isOpen()) {
      if (token) this._setTokenValue(token); // for the next connection
      return;
    }
    if (!token || token === this._socketToken) {
      // Nothing newer than what the connection holds (a cached token, or one minted in the same
      // second as the one it opened with): ask again later, while there is time.
      this._scheduleRefresh(this._socketExpMs);
      return;
    }
    this._pendingRefresh = token;
    this._send({ type: "refresh", token });
  }

  // -- frames ------------------------------------------------------------------------------

  _isOpen() {
    return this._ws !== null && this._opened && this._ws.readyState === WS_OPEN;
  }

  _send(frame) {
    if (!this._isOpen()) return false;
    try {
      this._ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  _sendSubscribe(entry) {
    const frame = { type: "subscribe", channel: entry.channel };
    if (entry.position) frame.since = entry.position;
    if (entry.presence) frame.presence = true;
    if (entry.rewind) frame.rewind = entry.rewind;
    entry.sentSince = entry.position ?? null;
    entry.active = false;
    entry.pendingPosition = null;
    this._send(frame);
  }

  _onData(data) {
    this._lastFrameAt = this._now();
    this._clearTimer("pong");
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : new TextDecoder().decode(data));
    } catch {
      this._emit("error", { code: "bad_frame", message: "frame from the server is not JSON" });
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "message":
        this._onMessageFrame(frame);
        break;
      case "subscribed":
        this._onSubscribed(frame);
        break;
      case "unsubscribed":
        this._onUnsubscribed(frame);
        break;
      case "pong":
        this._onPong(frame);
        break;
      case "refreshed":
        this._onRefreshed(frame);
        break;
      case "presence":
        this._onPresence(frame);
        break;
      case "join":
      case "leave":
        if (this._channels.has(frame.channel)) this._emit(frame.type, frame);
        break;
      case "error":
        this._onErrorFrame(frame);
        break;
      case "pod": // SSE: the stream's first event names its pod
        if (frame.pod && (frame.pod !== this._pod || !this._podAnnounced)) this._setPod(frame.pod, "sse");
        this._podAnnounced = true;
        break;
      case "close": // SSE: the server ends the stream (the code a websocket would get)
        this._onStreamClose(frame);
        break;
      default:
        break; // unknown frames are ignored (forward compatible)
    }
  }

  _onMessageFrame(frame) {
    const entry = this._channels.get(frame.channel);
    if (!entry || !entry.active) return; // not (yet) subscribed on this connection
    const id = frame.id;
    if (typeof id === "string") {
      if (entry.seen.has(id)) return; // a duplicate: already delivered
      entry.seen.add(id);
      if (entry.seen.size > this.options.dedupeSize) {
        entry.seen.delete(entry.seen.values().next().value);
      }
      entry.position = id;
      entry.pendingPosition = null;
    }
    try {
      entry.handler(frame);
    } catch (error) {
      this._emit("error", { code: "handler", message: String(error), channel: frame.channel, error });
    }
  }

  _onSubscribed(frame) {
    const entry = this._channels.get(frame.channel);
    if (!entry) return;
    entry.active = true;
    if (entry.quiet && frame.recovered === true) {
      // The stream was reopened by this client (a new channel list or token): nothing to say.
      entry.quiet = false;
      entry.pendingPosition = frame.position ?? null;
      for (const w of entry.waiters.splice(0)) w.resolve(frame);
      return;
    }
    entry.quiet = false;
    const since = entry.sentSince;
    // A rewind's messages follow: like a replay, the frame's position is adopted only once they
    // are in (a message, or the next pong), so a connection lost before asks for them again.
    const rewinding = Boolean(frame.rewound?.count);
    if (frame.recovered === false) {
      // This pod cannot prove nothing was missed: start over from where it stands now.
      if (rewinding) entry.pendingPosition = frame.position ?? null;
      else entry.position = frame.position ?? entry.position;
      this._emit("gap", { channel: frame.channel, since, position: frame.position });
    } else if (frame.recovered === true) {
      // The replay follows this frame; keep `since` until a message (or the pong that follows
      // the replay) proves where we are, so a disconnect mid-replay never skips anything.
      entry.pendingPosition = frame.position ?? null;
      this._emit("recovered", { channel: frame.channel, since, position: frame.position });
    } else if (rewinding) {
      entry.pendingPosition = frame.position ?? null;
    } else if (frame.position) {
      entry.position = frame.position; // no `since`: nothing is replayed
    }
    this._emit("subscribed", frame);
    for (const w of entry.waiters.splice(0)) w.resolve(frame);
  }

  _onUnsubscribed(frame) {
    const channel = frame.channel;
    const pending = this._pendingUnsubscribes.get(channel) ?? 0;
    if (pending > 0) {
      if (pending === 1) this._pendingUnsubscribes.delete(channel);
      else this._pendingUnsubscribes.set(channel, pending - 1);
      return; // the answer to our own unsubscribe
    }
    // The server dropped it (a refreshed token no longer allows the channel).
    const entry = this._channels.get(channel);
    if (entry) {
      this._channels.delete(channel);
      for (const w of entry.waiters.splice(0)) {
        w.reject(new PubsockError("unsubscribed", "unsubscribed by the server", channel));
      }
    }
    this._emit("unsubscribed", { channel, byServer: true });
  }

  _onPong(frame) {
    // Every replay of a `since` subscribe sent before the ping has arrived by now.
    for (const entry of this._channels.values()) {
      if (entry.active && entry.pendingPosition) {
        entry.position = entry.pendingPosition;
        entry.pendingPosition = null;
      }
    }
    if (frame.pod && (frame.pod !== this._pod || !this._podAnnounced)) this._setPod(frame.pod, "ws");
    this._podAnnounced = true;
  }

  _setPod(pod, via) {
    this._pod = pod;
    this._emit("pod", { pod, via });
  }

  _onRefreshed(frame) {
    if (this._pendingRefresh) {
      this._socketToken = this._pendingRefresh;
      this._socketExpMs = tokenExpiryMs(this._pendingRefresh);
      this._setTokenValue(this._pendingRefresh);
      this._pendingRefresh = null;
    }
    const expMs = typeof frame.expires_at === "number" ? frame.expires_at * 1000 : this._socketExpMs;
    this._socketExpMs = expMs;
    this._emit("refreshed", { expires_at: frame.expires_at });
    this._scheduleRefresh(expMs);
  }

  _onPresence(frame) {
    const waiters = this._presenceWaiters.get(frame.channel);
    if (waiters) {
      this._presenceWaiters.delete(frame.channel);
      for (const w of waiters) {
        this._clearTimeout(w.timer);
        w.resolve(frame);
      }
    }
    this._emit("presence", frame);
  }

  _onErrorFrame(frame) {
    const { code, message, channel } = frame;
    if (channel) {
      const entry = this._channels.get(channel);
      if (entry && !entry.active) {
        // The subscribe was refused: drop it, or every reconnect would ask again.
        this._channels.delete(channel);
        for (const w of entry.waiters.splice(0)) w.reject(new PubsockError(code, message, channel));
      }
      const waiters = this._presenceWaiters.get(channel);
      if (waiters && (code === "forbidden" || code === "bad_channel")) {
        this._presenceWaiters.delete(channel);
        for (const w of waiters) {
          this._clearTimeout(w.timer);
          w.reject(new PubsockError(code, message, channel));
        }
      }
    } else if (code === "forbidden" && this._pendingRefresh) {
      this._pendingRefresh = null; // refused: the old token stays in force until it expires
    }
    this._emit("error", { ...frame });
  }

  // -- small helpers -----------------------------------------------------------------------

  _setState(state, extra = {}) {
    this._state = state;
    this._emit("state", { state, ...extra });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _clearTimer(name) {
    const timer = this._timers[name];
    if (timer !== undefined) {
      this._clearTimeout(timer);
      this._timers[name] = undefined;
    }
  }

  _sleep(ms) {
    return new Promise((resolve) => this._setTimeout(resolve, ms));
  }
}

function retryAfter(response) {
  const value = response.headers?.get?.("Retry-After");
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, date - Date.now());
}

export default PubsockClient;
