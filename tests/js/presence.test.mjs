// Presence: queries, join/leave events, errors.

import assert from "node:assert/strict";
import { test } from "node:test";

import { connected, setup } from "./harness.mjs";

test("a presence query resolves with count and members and emits presence", async () => {
  const ctx = setup();
  const ws = await connected(ctx);
  const answer = ctx.client.presence("demo:lobby");
  assert.deepEqual(ws.sentOf("presence"), [{ type: "presence", channel: "demo:lobby" }]);
  const frame = {
    type: "presence",
    channel: "demo:lobby",
    count: 3,
    members: [{ sub: "ada" }, { sub: "bob" }],
  };
  ws.receive(frame);
  assert.deepEqual(await answer, frame);
  assert.deepEqual(ctx.events.of("presence"), [frame]);
});

test("a presence query times out, or fails when not connected", async () => {
  const ctx = setup({ presenceTimeoutMs: 1000 });
  await assert.rejects(ctx.client.presence("demo:lobby"), { code: "not_connected" });
  await connected(ctx);
  const answer = ctx.client.presence("demo:lobby");
  await ctx.clock.advance(1000);
  await assert.rejects(answer, { code: "timeout" });
});

test("a forbidden presence query rejects", async () => {
  const ctx = setup();
  const ws = await connected(ctx);
  const answer = ctx.client.presence("secret:1");
  ws.receive({ type: "error", code: "forbidden", message: "no", channel: "secret:1" });
  await assert.rejects(answer, { code: "forbidden", channel: "secret:1" });
});

test("a lost connection rejects pending presence queries", async () => {
  const ctx = setup();
  const ws = await connected(ctx);
  const answer = ctx.client.presence("demo:lobby");
  ws.serverClose(1012);
  await assert.rejects(answer, { code: "not_connected" });
});

test("join and leave events of subscribed channels are emitted", async () => {
  const ctx = setup();
  ctx.client.subscribe("demo:lobby", () => {}, { presence: true });
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "demo:lobby", position: "@1" });
  ws.receive({ type: "join", channel: "demo:lobby", sub: "bob" });
  ws.receive({ type: "leave", channel: "demo:lobby", sub: "bob" });
  ws.receive({ type: "join", channel: "demo:other", sub: "eve" }); // not ours: ignored
  assert.deepEqual(ctx.events.of("join"), [{ type: "join", channel: "demo:lobby", sub: "bob" }]);
  assert.deepEqual(ctx.events.of("leave"), [{ type: "leave", channel: "demo:lobby", sub: "bob" }]);
});

test("changing presence on a subscription resubscribes from its position", async () => {
  const ctx = setup();
  const handler = () => {};
  ctx.client.subscribe("demo:lobby", handler);
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "demo:lobby", position: "@7" });
  ctx.client.subscribe("demo:lobby", handler, { presence: true });
  assert.deepEqual(ws.sentOf("subscribe").at(-1), {
    type: "subscribe",
    channel: "demo:lobby",
    since: "@7",
    presence: true,
  });
  // Same options again: nothing is sent.
  ws.receive({ type: "subscribed", channel: "demo:lobby", position: "@7", recovered: true });
  await ctx.client.subscribe("demo:lobby", handler, { presence: true });
  assert.equal(ws.sentOf("subscribe").length, 2);
});
