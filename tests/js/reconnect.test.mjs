// Reconnect policy: full-jitter backoff, close codes 1012/1013/1008, the warm-up request,
// dead connections and close().

import assert from "node:assert/strict";
import { test } from "node:test";

import { fullJitter } from "../../web/pubsock.js";
import { fakeFetch, flush, makeToken, sequence } from "./fakes.mjs";
import { connected, nextSocket, reconnected, setup } from "./harness.mjs";

test("fullJitter draws uniformly below a cap that doubles up to the maximum", () => {
  const caps = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000];
  caps.forEach((cap, attempt) => {
    assert.equal(fullJitter(attempt, 500, 30000, () => 0), 0);
    assert.equal(fullJitter(attempt, 500, 30000, () => 0.5), cap / 2);
    assert.equal(fullJitter(attempt, 500, 30000, () => 0.999999), cap - 1);
  });
  assert.equal(fullJitter(1000, 500, 30000, () => 0.999999), 29999); // no overflow
});

test("failed connections back off with full jitter, growing to the maximum", async () => {
  const values = [0.999, 0.1, 0.999, 0.5, 0.999, 0.999, 0.999, 0.999];
  const ctx = setup({ random: sequence(...values), backoffBaseMs: 100, backoffMaxMs: 1000 });
  ctx.client.connect();
  let ws = await nextSocket(ctx, 1);
  for (let i = 0; i < values.length; i++) {
    ws.fail();
    const delay = ctx.events.of("reconnecting").at(-1).delay;
    const cap = Math.min(1000, 100 * 2 ** i);
    assert.ok(delay >= 0 && delay < cap, `attempt ${i}: ${delay} not in [0, ${cap})`);
    assert.equal(delay, Math.floor(values[i] * cap));
    // Nothing happens before the delay has passed.
    await ctx.clock.advance(Math.max(0, delay - 1));
    assert.equal(ctx.WS.instances.length, i + 1);
    await ctx.clock.advance(1);
    ws = await nextSocket(ctx, i + 2);
  }
  assert.deepEqual(
    ctx.events.of("reconnecting").map((e) => e.code),
    values.map(() => 1006),
  );
});

test("the backoff resets once a connection has been stable", async () => {
  const ctx = setup({ random: () => 0.999, backoffBaseMs: 100, stableAfterMs: 5000 });
  ctx.client.connect();
  let ws = await nextSocket(ctx, 1);
  ws.fail();
  ws = await reconnected(ctx); // attempt 1 opened
  ws.serverClose(1013);
  assert.equal(ctx.events.of("reconnecting").at(-1).delay, 199); // second attempt: cap 200
  ws = await reconnected(ctx);
  await ctx.clock.advance(5000);
  ws.serverClose(1013);
  assert.equal(ctx.events.of("reconnecting").at(-1).delay, 99); // back to the first cap
});

test("1012 reconnects at once, a second 1012 before the connection is stable backs off", async () => {
  const ctx = setup({ random: () => 0.5, backoffBaseMs: 1000, stableAfterMs: 5000 });
  let ws = await connected(ctx);
  ws.serverClose(1012, "draining");
  assert.deepEqual(ctx.events.of("reconnecting").at(-1), {
    code: 1012,
    reason: "draining",
    delay: 0,
    attempt: 0,
  });
  await ctx.clock.advance(0);
  ws = await nextSocket(ctx, 2);
  ws.open();
  ws.serverClose(1012);
  assert.equal(ctx.events.of("reconnecting").at(-1).delay, 500);
  ws = await reconnected(ctx);
  await ctx.clock.advance(5000); // stable again: the next 1012 is immediate again
  ws.serverClose(1012);
  assert.equal(ctx.events.of("reconnecting").at(-1).delay, 0);
});

test("1013 reconnects after a backoff that grows with each 1013", async () => {
  const ctx = setup({ random: () => 0.5, backoffBaseMs: 1000, backoffMaxMs: 60000 });
  let ws = await connected(ctx);
  const delays = [];
  for (let i = 0; i < 4; i++) {
    ws.serverClose(1013, "overloaded");
    const { delay, code } = ctx.events.of("reconnecting").at(-1);
    assert.equal(code, 1013);
    delays.push(delay);
    await ctx.clock.advance(delay - 1);
    assert.equal(ctx.WS.instances.length, i + 1, "reconnected before the backoff passed");
    await ctx.clock.advance(1);
    ws = await nextSocket(ctx, i + 2);
    ws.open();
  }
  assert.deepEqual(delays, [500, 1000, 2000, 4000]);
});

test("1008 fetches a new token before reconnecting", async () => {
  const clockStart = 1_700_000_000_000;
  let issued = 0;
  const getToken = async () => makeToken({ sub: "ada", exp: clockStart / 1000 + 3600, n: ++issued });
  const ctx = setup({ getToken });
  let ws = await connected(ctx);
  assert.equal(issued, 1);
  const first = ws.token;
  ws.serverClose(1008, "token expired");
  ws = await reconnected(ctx);
  assert.equal(issued, 2);
  assert.notEqual(ws.token, first);
  assert.equal(ctx.client.token, ws.token);
  // Any other close reuses a token that is still good.
  ws.serverClose(1013);
  ws = await reconnected(ctx);
  assert.equal(issued, 2);
});

test("a token near expiry is replaced before a reconnect", async () => {
  const start = 1_700_000_000_000;
  const near = makeToken({ sub: "ada", exp: start / 1000 + 30 }); // inside the 60 s margin
  const fresh = makeToken({ sub: "ada", exp: start / 1000 + 3600 });
  let calls = 0;
  const ctx = setup({ token: near, getToken: async () => (calls++, fresh) });
  ctx.client.connect();
  const ws = await nextSocket(ctx, 1);
  assert.equal(calls, 1);
  assert.equal(ws.token, fresh);
});

test("repeated failed handshakes fetch a new token (the browser cannot see a 401)", async () => {
  const start = 1_700_000_000_000;
  let calls = 0;
  const getToken = async () => makeToken({ sub: "ada", exp: start / 1000 + 3600, n: ++calls });
  const ctx = setup({ getToken, tokenRefetchAfterFailures: 2 });
  ctx.client.connect();
  let ws = await nextSocket(ctx, 1);
  assert.equal(calls, 1);
  ws.fail();
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  ws = await nextSocket(ctx, 2);
  assert.equal(calls, 1);
  ws.fail();
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  ws = await nextSocket(ctx, 3);
  assert.equal(calls, 2);
});

test("a plain HTTP request precedes every websocket, and pod events name the serving pod", async () => {
  const order = [];
  const fetch = fakeFetch(async (url) => {
    order.push(`fetch ${url}`);
  });
  const ctx = setup({ fetch });
  const Base = ctx.WS;
  ctx.WS = class extends Base {
    constructor(url) {
      super(url);
      order.push("websocket");
    }
  };
  ctx.client._WebSocket = ctx.WS;
  const ws = await connected(ctx);
  assert.deepEqual(order, ["fetch http://pubsock.test/config.json", "websocket"]);
  assert.equal(fetch.calls[0].init.credentials, "include");
  assert.deepEqual(ctx.events.of("pod"), [{ pod: "pod-a", via: "http" }]);
  assert.deepEqual(ws.sentOf("ping"), [{ type: "ping" }]);
  ws.receive({ type: "pong", pod: "pod-b" });
  assert.deepEqual(ctx.events.of("pod").at(-1), { pod: "pod-b", via: "ws" });
  assert.equal(ctx.client.pod, "pod-b");
  ws.receive({ type: "pong", pod: "pod-b" });
  assert.equal(ctx.events.of("pod").length, 2, "same pod: no new event");
});

test("a hanging warm-up request does not block the connection", async () => {
  const fetch = fakeFetch(() => new Promise(() => {}));
  const ctx = setup({ fetch, warmupTimeoutMs: 2000 });
  ctx.client.connect();
  await flush();
  assert.equal(ctx.WS.instances.length, 0);
  await ctx.clock.advance(2000);
  await nextSocket(ctx, 1);
});

test("the warm-up request can be turned off", async () => {
  const ctx = setup({ configUrl: null });
  await connected(ctx);
  assert.equal(ctx.fetch.calls.length, 0);
});

test("state events follow the connection", async () => {
  const ctx = setup();
  const ws = await connected(ctx);
  ws.serverClose(1013);
  assert.deepEqual(
    ctx.events.of("state").map((e) => e.state),
    ["connecting", "open", "closed"],
  );
  assert.equal(ctx.events.of("state").at(-1).code, 1013);
  assert.equal(ctx.client.state, "closed");
});

test("a connection that answers no ping is dropped and replaced", async () => {
  const ctx = setup({ pingIntervalMs: 1000, pongTimeoutMs: 500 });
  const ws = await connected(ctx);
  ws.receive({ type: "pong", pod: "p" });
  await ctx.clock.advance(1000);
  assert.equal(ws.sentOf("ping").length, 2);
  ws.receive({ type: "pong", pod: "p" }); // alive
  await ctx.clock.advance(1000);
  assert.equal(ws.sentOf("ping").length, 3);
  await ctx.clock.advance(500); // silence
  assert.equal(ws.closedWith, 1000);
  assert.equal(ctx.events.of("reconnecting").at(-1).code, 1006);
  assert.equal(ctx.events.of("reconnecting").at(-1).reason, "no pong");
});

test("a handshake that never completes times out", async () => {
  const ctx = setup({ connectTimeoutMs: 3000 });
  ctx.client.connect();
  await nextSocket(ctx, 1);
  await ctx.clock.advance(3000);
  assert.equal(ctx.events.of("reconnecting").at(-1).reason, "connect timeout");
});

test("close() stops for good, and ignores the old socket", async () => {
  const ctx = setup();
  const ws = await connected(ctx);
  ctx.client.close();
  assert.equal(ws.closedWith, 1000);
  ws.serverClose(1012);
  await ctx.clock.advance(60000);
  assert.equal(ctx.WS.instances.length, 1);
  assert.equal(ctx.events.of("reconnecting").length, 0);
  assert.equal(ctx.client.state, "closed");
});

test("frames of a replaced socket are ignored", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  const old = await connected(ctx);
  old.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  old.serverClose(1012);
  const ws = await reconnected(ctx);
  old.receive({ type: "message", channel: "room:1", id: "late", data: 1, ts: 1 });
  ws.receive({ type: "message", channel: "room:1", id: "early", data: 1, ts: 1 }); // before subscribed
  ws.receive({ type: "subscribed", channel: "room:1", position: "x", recovered: true });
  ws.receive({ type: "message", channel: "room:1", id: "m1", data: 1, ts: 1 });
  assert.deepEqual(seen, ["m1"]);
});
