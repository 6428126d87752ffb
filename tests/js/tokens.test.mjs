// Tokens: JWT expiry, the `refresh` frame before expiry and its answers.

import assert from "node:assert/strict";
import { test } from "node:test";

import { decodeJwtPayload, tokenExpiryMs } from "../../web/pubsock.js";
import { makeToken } from "./fakes.mjs";
import { connected, reconnected, setup } from "./harness.mjs";

const START_S = 1_700_000_000; // the fake clock's start, in seconds
const QUIET = { pingIntervalMs: 1e12 }; // these tests move the clock by minutes: no heartbeat

test("the JWT payload is decoded from base64url, UTF-8 included", () => {
  const token = makeToken({ sub: "Zoë ✓", exp: 1234, channels: ["demo:*"] });
  assert.deepEqual(decodeJwtPayload(token), { sub: "Zoë ✓", exp: 1234, channels: ["demo:*"] });
  assert.equal(tokenExpiryMs(token), 1_234_000);
  assert.equal(decodeJwtPayload("not-a-jwt"), null);
  assert.equal(decodeJwtPayload("a.%%%.c"), null);
  assert.equal(tokenExpiryMs(makeToken({ sub: "x" })), null);
});

test("the token goes in the query string", async () => {
  const token = makeToken({ sub: "ada", exp: START_S + 3600 });
  const ctx = setup({ token });
  const ws = await connected(ctx);
  assert.equal(ws.token, token);
  assert.ok(ws.url.startsWith("ws://pubsock.test/ws?token="));
});

test("a refresh frame is sent a margin before expiry, and refreshed is handled", async () => {
  const tokens = [
    makeToken({ sub: "ada", exp: START_S + 600, n: 1 }),
    makeToken({ sub: "ada", exp: START_S + 1200, n: 2 }),
    makeToken({ sub: "ada", exp: START_S + 1800, n: 3 }),
  ];
  let issued = 0;
  const ctx = setup({ ...QUIET, getToken: async () => tokens[issued++], refreshMarginMs: 60000 });
  const ws = await connected(ctx);
  assert.equal(ws.token, tokens[0]);
  await ctx.clock.advance(540000 - 1);
  assert.equal(ws.sentOf("refresh").length, 0);
  await ctx.clock.advance(1);
  assert.deepEqual(ws.sentOf("refresh"), [{ type: "refresh", token: tokens[1] }]);
  assert.equal(ctx.client.token, tokens[0], "not in force before the server confirms");
  ws.receive({ type: "refreshed", expires_at: START_S + 1200 });
  assert.deepEqual(ctx.events.of("refreshed"), [{ expires_at: START_S + 1200 }]);
  assert.equal(ctx.client.token, tokens[1]);
  // The next refresh is planned from the new expiry: 1200 - 60 s after the start.
  await ctx.clock.advance(1140000 - 540000 - 1);
  assert.equal(ws.sentOf("refresh").length, 1);
  await ctx.clock.advance(1);
  assert.deepEqual(ws.sentOf("refresh")[1], { type: "refresh", token: tokens[2] });
});

test("a short-lived token is refreshed at half its remaining life", async () => {
  const tokens = [
    makeToken({ sub: "ada", exp: START_S + 60, n: 1 }),
    makeToken({ sub: "ada", exp: START_S + 120, n: 2 }),
    makeToken({ sub: "ada", exp: START_S + 180, n: 3 }),
  ];
  let issued = 0;
  const ctx = setup({ ...QUIET, getToken: async () => tokens[issued++], refreshMarginMs: 60000 });
  const ws = await connected(ctx);
  assert.equal(ws.token, tokens[0]); // 60 s left: inside the margin, refresh at half of it
  await ctx.clock.advance(29999);
  assert.equal(ws.sentOf("refresh").length, 0);
  await ctx.clock.advance(1);
  assert.deepEqual(ws.sentOf("refresh"), [{ type: "refresh", token: tokens[1] }]);
  ws.receive({ type: "refreshed", expires_at: START_S + 120 });
  await ctx.clock.advance(45000 - 1); // 90 s left: half is 45 s
  assert.equal(ws.sentOf("refresh").length, 1);
  await ctx.clock.advance(1);
  assert.deepEqual(ws.sentOf("refresh")[1], { type: "refresh", token: tokens[2] });
});

test("a refused refresh keeps the old token", async () => {
  const first = makeToken({ sub: "ada", exp: START_S + 600 });
  const other = makeToken({ sub: "eve", exp: START_S + 1200 });
  const ctx = setup({ ...QUIET, token: first, getToken: async () => other });
  const ws = await connected(ctx);
  await ctx.clock.advance(540000);
  assert.deepEqual(ws.sentOf("refresh"), [{ type: "refresh", token: other }]);
  ws.receive({ type: "error", code: "forbidden", message: "another subject" });
  assert.equal(ctx.client.token, first);
  assert.equal(ctx.events.of("error").at(-1).code, "forbidden");
  assert.equal(ctx.events.of("refreshed").length, 0);
});

test("without a connection the fresh token waits for the next one", async () => {
  const tokens = [
    makeToken({ sub: "ada", exp: START_S + 600, n: 1 }),
    makeToken({ sub: "ada", exp: START_S + 1200, n: 2 }),
  ];
  let issued = 0;
  const ctx = setup({ ...QUIET, getToken: async () => tokens[issued++] });
  let ws = await connected(ctx);
  await ctx.clock.advance(540000);
  ws.serverClose(1012); // the refresh was sent, never answered
  ws = await reconnected(ctx);
  assert.equal(ws.token, tokens[1]);
  assert.equal(issued, 2);
});

test("setToken sends a refresh on an open connection", async () => {
  const ctx = setup({ token: makeToken({ sub: "ada", exp: START_S + 600 }) });
  const ws = await connected(ctx);
  const fresh = makeToken({ sub: "ada", exp: START_S + 6000 });
  ctx.client.setToken(fresh);
  assert.deepEqual(ws.sentOf("refresh"), [{ type: "refresh", token: fresh }]);
  ws.receive({ type: "refreshed", expires_at: START_S + 6000 });
  assert.equal(ctx.client.token, fresh);
});

test("a failing getToken is reported and retried with backoff", async () => {
  let calls = 0;
  const ctx = setup({
    getToken: async () => {
      calls++;
      if (calls === 1) throw new Error("backend down");
      return makeToken({ sub: "ada", exp: START_S + 3600 });
    },
  });
  ctx.client.connect();
  await ctx.clock.advance(0);
  assert.equal(ctx.events.of("error")[0].code, "token");
  assert.equal(ctx.WS.instances.length, 0);
  await reconnected(ctx);
  assert.equal(calls, 2);
  assert.equal(ctx.client.state, "open");
});
