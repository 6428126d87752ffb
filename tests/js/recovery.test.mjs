// Positions, resubscribe with `since`, recovery and gaps, and at-most-once in-order delivery.

import assert from "node:assert/strict";
import { test } from "node:test";

import { connected, reconnected, setup, subscribeFrames } from "./harness.mjs";

const msg = (id, channel = "room:1") => ({ type: "message", channel, id, data: { n: id }, ts: 1 });

test("a subscribe is sent on open, with presence when asked", async () => {
  const ctx = setup();
  const subscribed = ctx.client.subscribe("room:1", () => {}, { presence: true });
  ctx.client.subscribe("room:2", () => {});
  const ws = await connected(ctx);
  assert.deepEqual(subscribeFrames(ws), [
    { type: "subscribe", channel: "room:1", presence: true },
    { type: "subscribe", channel: "room:2" },
  ]);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@5" });
  assert.deepEqual(await subscribed, { type: "subscribed", channel: "room:1", position: "@5" });
});

test("resubscribes with since = the last message id", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1000" });
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  ws.serverClose(1012);
  ws = await reconnected(ctx);
  assert.deepEqual(subscribeFrames(ws), [{ type: "subscribe", channel: "room:1", since: "b" }]);
  assert.equal(ctx.client.position("room:1"), "b");
  assert.deepEqual(seen, ["a", "b"]);
});

test("resubscribes with since = the subscribed position when no message came", async () => {
  const ctx = setup();
  ctx.client.subscribe("room:1", () => {}, { presence: true });
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1700000000000" });
  ws.serverClose(1013);
  ws = await reconnected(ctx);
  assert.deepEqual(subscribeFrames(ws), [
    { type: "subscribe", channel: "room:1", since: "@1700000000000", presence: true },
  ]);
});

test("a subscribe with an explicit since resumes from it", async () => {
  const ctx = setup();
  ctx.client.subscribe("room:1", () => {}, { since: "01J0000000000000000000000X" });
  const ws = await connected(ctx);
  assert.equal(subscribeFrames(ws)[0].since, "01J0000000000000000000000X");
});

test("recovered: true replays in order, without duplicates, and emits recovered", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  ws.receive(msg("b")); // a redelivery
  ws.serverClose(1012);
  ws = await reconnected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "d", recovered: true });
  ws.receive(msg("b")); // overlap with what was delivered
  ws.receive(msg("c"));
  ws.receive(msg("d"));
  ws.receive(msg("c")); // a publish retry, same id
  ws.receive(msg("e")); // live
  assert.deepEqual(seen, ["a", "b", "c", "d", "e"]);
  assert.deepEqual(ctx.events.of("recovered"), [{ channel: "room:1", since: "b", position: "d" }]);
  assert.equal(ctx.events.of("gap").length, 0);
});

test("recovered: false emits gap and resumes from the new position", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ws.receive(msg("a"));
  ws.serverClose(1013);
  ws = await reconnected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@9", recovered: false });
  assert.deepEqual(ctx.events.of("gap"), [{ channel: "room:1", since: "a", position: "@9" }]);
  assert.equal(ctx.client.position("room:1"), "@9");
  ws.receive(msg("z"));
  assert.deepEqual(seen, ["a", "z"]);
  ws.serverClose(1012);
  ws = await reconnected(ctx);
  assert.equal(subscribeFrames(ws)[0].since, "z");
});

test("after recovered: true the old since is kept until the replay is known complete", async () => {
  const ctx = setup();
  ctx.client.subscribe("room:1", () => {});
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ws.receive(msg("a"));
  ws.serverClose(1012);
  ws = await reconnected(ctx);
  // The replay (b, c) is still on its way when the connection drops: resume from a again.
  ws.receive({ type: "subscribed", channel: "room:1", position: "c", recovered: true });
  ws.serverClose(1012);
  ws = await reconnected(ctx);
  assert.equal(subscribeFrames(ws)[0].since, "a");
  // This time nothing was replayed: the pong after the subscribe proves it, the position advances.
  ws.receive({ type: "subscribed", channel: "room:1", position: "@5000", recovered: true });
  assert.equal(ctx.client.position("room:1"), "a");
  ws.receive({ type: "pong", pod: "p" });
  assert.equal(ctx.client.position("room:1"), "@5000");
});

test("the duplicate filter is bounded", async () => {
  const ctx = setup({ dedupeSize: 3 });
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  for (const id of ["a", "b", "c", "d", "c", "d"]) ws.receive(msg(id));
  assert.deepEqual(seen, ["a", "b", "c", "d"]);
  assert.equal(ctx.client._channels.get("room:1").seen.size, 3);
});

test("duplicates are filtered per channel", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(`1/${m.id}`));
  ctx.client.subscribe("room:2", (m) => seen.push(`2/${m.id}`));
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ws.receive({ type: "subscribed", channel: "room:2", position: "@1" });
  ws.receive(msg("x", "room:1"));
  ws.receive(msg("x", "room:2"));
  ws.receive(msg("x", "room:1"));
  assert.deepEqual(seen, ["1/x", "2/x"]);
});

test("unsubscribe stops delivery; its answer does not drop a new subscription", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ctx.client.unsubscribe("room:1");
  assert.deepEqual(ws.sentOf("unsubscribe"), [{ type: "unsubscribe", channel: "room:1" }]);
  ws.receive(msg("in-flight"));
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  ws.receive({ type: "unsubscribed", channel: "room:1" }); // answers the unsubscribe
  ws.receive(msg("still-in-flight"));
  ws.receive({ type: "subscribed", channel: "room:1", position: "@2" });
  ws.receive(msg("new"));
  assert.deepEqual(seen, ["new"]);
  assert.deepEqual(ctx.client.channels(), ["room:1"]);
  assert.equal(ctx.events.of("unsubscribed").length, 0);
});

test("a server-side unsubscribe (token no longer allows the channel) drops it", async () => {
  const ctx = setup();
  ctx.client.subscribe("room:1", () => {});
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ws.receive({ type: "unsubscribed", channel: "room:1" });
  assert.deepEqual(ctx.events.of("unsubscribed"), [{ channel: "room:1", byServer: true }]);
  assert.deepEqual(ctx.client.channels(), []);
});

test("a refused subscribe rejects, is dropped and reported as an error event", async () => {
  const ctx = setup();
  const promise = ctx.client.subscribe("secret:1", () => {});
  const ws = await connected(ctx);
  ws.receive({ type: "error", code: "forbidden", message: "not allowed", channel: "secret:1" });
  await assert.rejects(promise, { name: "PubsockError", code: "forbidden", channel: "secret:1" });
  assert.deepEqual(ctx.client.channels(), []);
  assert.deepEqual(ctx.events.of("error"), [
    { type: "error", code: "forbidden", message: "not allowed", channel: "secret:1" },
  ]);
  ws.serverClose(1012);
  const next = await reconnected(ctx);
  assert.deepEqual(subscribeFrames(next), []);
});

test("a handler that throws does not stop delivery", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => {
    seen.push(m.id);
    if (m.id === "a") throw new Error("boom");
  });
  const ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "@1" });
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  assert.deepEqual(seen, ["a", "b"]);
  assert.equal(ctx.events.of("error")[0].code, "handler");
});
