// Fakes for the browser client's tests: a manual clock with timers, a scripted WebSocket class,
// a scripted fetch, and JWTs with chosen claims. Not a test file itself (no `.test.` in its name).

import { setImmediate as macrotask } from "node:timers/promises";

/** Lets every pending promise callback run (a few macrotask turns). */
export async function flush(turns = 5) {
  for (let i = 0; i < turns; i++) await macrotask();
}

/** A manual clock: timers only fire when the test advances time. */
export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.time = start;
    this.timers = new Map();
    this.nextId = 1;
    this.now = () => this.time;
    this.setTimeout = (fn, ms = 0) => {
      const id = this.nextId++;
      this.timers.set(id, { fn, at: this.time + Math.max(0, ms), id });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
  }

  /** Moves time forward by `ms`, firing due timers in order and flushing promises after each. */
  async advance(ms) {
    const until = this.time + ms;
    for (;;) {
      await flush();
      let next = null;
      for (const timer of this.timers.values()) {
        if (timer.at <= until && (next === null || timer.at < next.at || (timer.at === next.at && timer.id < next.id))) {
          next = timer;
        }
      }
      if (next === null) break;
      this.timers.delete(next.id);
      this.time = Math.max(this.time, next.at);
      next.fn();
    }
    this.time = until;
    await flush();
  }

  /** Delays of the pending timers, relative to now (sorted). */
  pending() {
    return [...this.timers.values()].map((t) => t.at - this.time).sort((a, b) => a - b);
  }
}

/**
 * A WebSocket stand-in; the test plays the server through open/receive/serverClose.
 * Use `socketClass()` to get a subclass with its own list of instances.
 */
export class FakeWebSocket {
  static instances = [];

  static get last() {
    return this.instances.at(-1);
  }

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    new.target.instances.push(this);
  }

  get token() {
    return new URL(this.url).searchParams.get("token");
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(data));
  }

  close(code = 1000) {
    this.closedWith = code;
    this.readyState = 3;
  }

  // -- the server's side ---------------------------------------------------------------
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(frame) {
    this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }

  /** A refused handshake, as a browser sees it: no open, then close 1006. */
  fail() {
    this.readyState = 3;
    this.onerror?.({});
    this.onclose?.({ code: 1006, reason: "", wasClean: false });
  }

  sentOf(type) {
    return this.sent.filter((frame) => frame.type === type);
  }
}

/** A fresh FakeWebSocket subclass that records its own instances. */
export function socketClass() {
  return class extends FakeWebSocket {
    static instances = [];
  };
}

/**
 * An EventSource stand-in; the test plays the server: open, emit(type, data, id), end (the
 * response ended or failed: the browser would reconnect on its own, the client must not let it).
 */
export class FakeEventSource {
  static instances = [];

  static get last() {
    return this.instances.at(-1);
  }

  constructor(url, init = {}) {
    this.url = url;
    this.withCredentials = Boolean(init.withCredentials);
    this.readyState = 0;
    this.closed = false;
    this.lastEventId = "";
    this.listeners = new Map();
    this.onopen = this.onmessage = this.onerror = null;
    new.target.instances.push(this);
  }

  get params() {
    return new URL(this.url).searchParams;
  }

  addEventListener(type, listener) {
    const list = this.listeners.get(type) ?? [];
    list.push(listener);
    this.listeners.set(type, list);
  }

  close() {
    this.closed = true;
    this.readyState = 2;
  }

  // -- the server's side ---------------------------------------------------------------
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  /** One event; `id` (when given) becomes the lastEventId, as the `id:` field does. */
  emit(type, data, id) {
    if (this.closed) return;
    if (id !== undefined) this.lastEventId = id;
    const event = { type, data: JSON.stringify(data), lastEventId: this.lastEventId };
    if (type === "message") this.onmessage?.(event);
    else for (const listener of this.listeners.get(type) ?? []) listener(event);
  }

  /** The response ended, or the request failed (a browser cannot tell a 401 from a 503). */
  end() {
    if (this.closed) return;
    this.readyState = 0;
    this.onerror?.({});
  }
}

/** A fresh FakeEventSource subclass that records its own instances. */
export function eventSourceClass() {
  return class extends FakeEventSource {
    static instances = [];
  };
}

export function response(status, body = {}, headers = {}) {
  const lower = Object.fromEntries(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), String(v)]));
  return {
    status,
    ok: status >= 200 && status < 300,
    headers: { get: (name) => lower[name.toLowerCase()] ?? null },
    json: async () => body,
  };
}

/** A fetch that records calls and answers with `handler(url, init)` (default: 404 for the API). */
export function fakeFetch(handler = null, { pod = "pod-a" } = {}) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    calls.push({ url, init, body: init.body ? JSON.parse(init.body) : undefined });
    if (handler) {
      const answer = await handler(url, init, calls.length);
      if (answer) return answer;
    }
    if (String(url).endsWith("/config.json")) {
      return response(200, { api_base: "", pod }, { "X-Pubsock-Pod": pod });
    }
    return response(404, { detail: "not found" });
  };
  fetch.calls = calls;
  return fetch;
}

function base64url(text) {
  return Buffer.from(text).toString("base64url");
}

/** An (unsigned) JWT with the given claims; the client only reads `exp`. */
export function makeToken(claims) {
  return `${base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${base64url(JSON.stringify(claims))}.sig`;
}

/** A random() that returns the given values in turn (the last one repeats). */
export function sequence(...values) {
  let i = 0;
  return () => values[Math.min(i++, values.length - 1)];
}

/** Records every event of `client` as [type, detail]. */
export function recordEvents(client, types) {
  const events = [];
  for (const type of types) client.on(type, (detail) => events.push([type, detail]));
  events.of = (type) => events.filter(([t]) => t === type).map(([, d]) => d);
  return events;
}
