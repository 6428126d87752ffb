// Many Node clients in one process for make soak: the browser client (web/pubsock.js, unchanged)
// on the `ws` package (Node 20 has no global WebSocket: it is injected, with a fetch and a
// WebSocket that share one cookie jar per client, as a browser tab would), and real
// socket.io-client v4 sockets. Each records every event as a JSON line to the plan's `out` file.
//
//   node nodeclients.mjs PLAN.json
//
// stdin: {"cmd": "finish", "last": {channel: id}, "deadline_s": N}: stop changing channels, wait
// until every client has the last accepted id of each of its channels (or the deadline), write an
// `end` record per client, print {"ev": "done"} and exit. The records are those of
// devtools/soak/pyclients.py (join, leave, subd, msg, wiredup, state, pod, sio, end).
import { createWriteStream, readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { io } from "socket.io-client";
import WebSocket from "ws";
import { PubsockClient } from "../../web/pubsock.js";

const plan = JSON.parse(readFileSync(process.argv[2], "utf8"));
const out = createWriteStream(plan.out, { highWaterMark: 1 << 16 });

function record(c, e, fields = {}) {
  out.write(JSON.stringify({ c, e, t: Math.round(Date.now() * 10) / 10, ...fields }) + "\n");
}

// A small seeded generator (mulberry32): the churn schedule replays with the seed.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const random = rng(plan.seed);
const expo = (mean) => -Math.log(1 - random()) * mean;
const pick = (items) => items[Math.floor(random() * items.length)];

let calm = false; // no more channel changes
let calmAt = Infinity;
let finishing = false; // stopping the clients
const clients = [];

class Base {
  constructor(spec) {
    this.name = spec.name;
    this.churnS = spec.churn_s;
    this.delivered = new Map(); // channel -> Set of ids handed to the application
    this.joinedAt = new Map();
    this.changed = null;
  }
  // Every last id of each channel joined before the calm (a later join may stand past them).
  has(last) {
    for (const [channel, seen] of this.delivered) {
      if ((this.joinedAt.get(channel) ?? 0) > calmAt) continue;
      for (const id of last[channel] ?? []) if (!seen.has(id)) return false;
    }
    return true;
  }
  notify() {
    if (this.changed) this.changed();
  }
  churn() {
    if (!this.churnS || calm) return;
    setTimeout(() => {
      if (calm) return;
      const joined = [...this.delivered.keys()];
      const others = plan.pool.filter((c) => !this.delivered.has(c));
      if (joined.length > 1 && (others.length === 0 || random() < 0.5)) this.leave(pick(joined));
      else if (others.length) this.join(pick(others));
      this.churn();
    }, expo(this.churnS) * 1000);
  }
}

/** The browser client with an injected WebSocket and fetch sharing one cookie jar. */
class BrowserClient extends Base {
  constructor(spec) {
    super(spec);
    const jar = { cookie: "" };
    const self = this;
    const keep = (setCookies) => {
      for (const line of setCookies) {
        const pair = line.split(";")[0];
        if (pair.startsWith("GCLB=")) jar.cookie = pair;
      }
    };
    class CookieWebSocket extends WebSocket {
      constructor(url) {
        super(url, { headers: jar.cookie ? { Cookie: jar.cookie } : {} });
        this.on("upgrade", (response) => keep([].concat(response.headers["set-cookie"] ?? [])));
        // Wire-level check: an id arriving twice on this connection for a channel the client
        // is subscribed to (the client drops it; the contract: at most once per connection).
        const wire = new Map();
        this.on("message", (data, isBinary) => {
          if (isBinary) return;
          const text = data.toString();
          if (!text.startsWith('{"type":"message"')) return;
          const frame = JSON.parse(text);
          if (!self.client._channels.get(frame.channel)?.active) return;
          if (!wire.has(frame.channel)) wire.set(frame.channel, new Set());
          const seen = wire.get(frame.channel);
          if (seen.has(frame.id)) record(self.name, "wiredup", { ch: frame.channel, id: frame.id });
          seen.add(frame.id);
        });
      }
    }
    const cookieFetch = async (url, init = {}) => {
      const headers = { ...(init.headers ?? {}) };
      if (jar.cookie) headers.Cookie = jar.cookie;
      const response = await fetch(url, { ...init, headers, credentials: undefined });
      keep(response.headers.getSetCookie?.() ?? []);
      return response;
    };
    this.client = new PubsockClient({
      url: plan.url,
      token: plan.token,
      WebSocket: CookieWebSocket,
      fetch: cookieFetch,
      backoffMaxMs: 10000,
      pingIntervalMs: 10000,
    });
    const since = new Map();
    this.client.on("state", (d) => record(this.name, "state", { state: d.state, code: d.code ?? null }));
    this.client.on("pod", (d) => record(this.name, "pod", { pod: d.pod }));
    this.client.on("gap", (d) => since.set(d.channel, d.since));
    this.client.on("recovered", (d) => since.set(d.channel, d.since));
    this.client.on("subscribed", (frame) => {
      const rec = frame.recovered ?? null;
      record(this.name, "subd", {
        ch: frame.channel,
        pos: frame.position ?? null,
        rec,
        since: rec === null ? null : (since.get(frame.channel) ?? null),
      });
      since.delete(frame.channel);
    });
    this.client.on("error", () => {});
  }
  join(channel) {
    this.joinedAt.set(channel, Date.now());
    record(this.name, "join", { ch: channel });
    const seen = new Set();
    this.delivered.set(channel, seen);
    this.client
      .subscribe(channel, (frame) => {
        record(this.name, "msg", { ch: channel, id: frame.id, ts: frame.ts });
        seen.add(frame.id);
        this.notify();
      })
      .catch(() => {});
  }
  leave(channel) {
    record(this.name, "leave", { ch: channel });
    this.delivered.delete(channel);
    this.client.unsubscribe(channel);
  }
  start(channels) {
    for (const channel of channels) this.join(channel);
    this.client.connect().catch(() => {});
    this.churn();
  }
  stop() {
    this.client.close();
  }
}

/** A socket.io-client v4 socket: rooms by `join`/`leave` emits, recovery by socket.io itself. */
class SioClient extends Base {
  constructor(spec) {
    super(spec);
    this.wanted = new Map(); // room -> {position, joined}
    this.transports = spec.transports ?? ["polling", "websocket"];
    this.pod = null;
  }
  start(channels) {
    const socket = io(plan.sio_url, {
      forceNew: true,
      transports: this.transports,
      auth: { token: plan.token },
      withCredentials: true,
      reconnectionDelay: 500,
      reconnectionDelayMax: 10000,
      timeout: 10000,
    });
    this.socket = socket;
    const watch = () => {
      const engine = socket.io.engine;
      if (!engine || engine.__soak) return;
      engine.__soak = true;
      engine.on("handshake", (data) => {
        this.pod = data.pod ?? null;
        record(this.name, "pod", { pod: this.pod });
      });
    };
    // Every Engine.IO connection names its pod in its handshake: watch each new engine as soon
    // as the manager creates it (as tests/socketio/driver.mjs does).
    const manager = socket.io;
    const open = manager.open.bind(manager);
    manager.open = manager.connect = (fn) => {
      const result = open(fn);
      watch();
      return result;
    };
    watch();
    for (const room of channels) this.wanted.set(room, { position: null, joined: false, asked: false });
    socket.on("connect", () => {
      record(this.name, "state", { state: "open", code: null });
      const first = !this.connectedOnce;
      // socket.recovered is false on a first connect: only a reconnect's answer counts.
      record(this.name, "sio", { rec: first ? null : socket.recovered, pod: this.pod });
      this.connectedOnce = true;
      if (first) {
        for (const room of this.wanted.keys()) this.sendJoin(room, true);
      } else if (!socket.recovered) {
        // A new session: rejoin every room from where we stood (the ack says recovered or not).
        for (const [room, state] of this.wanted) {
          state.joined = false;
          this.sendJoin(room, false);
        }
      } else {
        for (const [room, state] of this.wanted) if (!state.joined) this.sendJoin(room, false);
      }
    });
    socket.on("disconnect", (reason) => {
      record(this.name, "state", { state: "closed", code: reason });
      if (reason === "io server disconnect" && !finishing) {
        setTimeout(() => socket.connect(), 200 + random() * 1000); // the server said go: come back
      }
    });
    socket.on("connect_error", () => {});
    socket.on("message", (data, meta) => {
      const room = meta?.channel;
      const seen = this.delivered.get(room);
      if (!seen || !this.wanted.get(room)?.joined) return; // left, or the join is not answered yet
      if (seen.has(meta.id)) return; // the documented slack of a recovery: drop it
      seen.add(meta.id);
      this.wanted.get(room).position = meta.id;
      record(this.name, "msg", { ch: room, id: meta.id, ts: meta.ts });
      this.notify();
    });
    this.churn();
  }
  sendJoin(room, fresh) {
    const state = this.wanted.get(room);
    if (!state || state.asked) return;
    state.asked = true;
    if (fresh) {
      record(this.name, "join", { ch: room });
      this.delivered.set(room, new Set());
    }
    const since = fresh ? null : state.position;
    const arg = since ? { room, since } : room;
    this.socket.timeout(15000).emit("join", arg, (err, ack) => {
      state.asked = false;
      if (this.wanted.get(room) !== state) return; // left meanwhile
      if (err || !ack?.ok) {
        if (this.socket.connected && !finishing) setTimeout(() => this.sendJoin(room, false), 500);
        return;
      }
      state.joined = true;
      if (!state.position) state.position = ack.position ?? null;
      record(this.name, "subd", {
        ch: room,
        pos: ack.position ?? null,
        rec: since ? (ack.recovered ?? null) : null,
        since,
        pod: this.pod,
      });
      if (since && ack.recovered === false) state.position = ack.position ?? state.position;
    });
  }
  join(room) {
    this.joinedAt.set(room, Date.now());
    this.wanted.set(room, { position: null, joined: false, asked: false });
    if (this.socket.connected) this.sendJoin(room, true);
    else {
      record(this.name, "join", { ch: room });
      this.delivered.set(room, new Set());
    }
  }
  leave(room) {
    record(this.name, "leave", { ch: room });
    this.wanted.delete(room);
    this.delivered.delete(room);
    if (this.socket.connected) this.socket.emit("leave", room);
  }
  stop() {
    this.socket.disconnect();
  }
}

const ramp = (plan.ramp_s ?? 0) * 1000;
plan.clients.forEach((spec, i) => {
  const client = spec.kind === "sio" ? new SioClient(spec) : new BrowserClient(spec);
  clients.push(client);
  setTimeout(() => client.start(spec.channels), (ramp * i) / Math.max(1, plan.clients.length));
});
process.stdout.write(JSON.stringify({ ev: "started" }) + "\n");

async function finish(command) {
  calm = true;
  const last = command.last ?? {};
  const deadline = Date.now() + (command.deadline_s ?? 60) * 1000;
  for (const client of clients) {
    while (!client.has(last) && Date.now() < deadline) {
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, Math.max(0, deadline - Date.now()));
        client.changed = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      client.changed = null;
    }
  }
  finishing = true;
  let complete = 0;
  for (const client of clients) {
    if (client.has(last)) complete++;
    record(client.name, "end", { drained: true });
    client.stop();
  }
  out.end(() => {
    process.stdout.write(JSON.stringify({ ev: "done", complete }) + "\n");
    process.exit(0);
  });
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  if (!line.trim()) return;
  const command = JSON.parse(line);
  if (command.cmd === "calm") {
    calm = true;
    calmAt = Date.now();
    process.stdout.write(JSON.stringify({ ev: "calm" }) + "\n");
  }
  if (command.cmd === "finish") finish(command);
});
lines.on("close", () => {
  if (!finishing) {
    finishing = true;
    for (const client of clients) record(client.name, "end", { drained: false });
    out.end(() => process.exit(0));
  }
});
process.on("SIGTERM", () => {
  for (const client of clients) record(client.name, "end", { drained: false });
  out.end(() => process.exit(0));
});
