// Rewind: a channel's recent messages on subscribe, asked again on every resubscribe, served by
// the server only where `since` does not recover; positions adopted only once the rewind is in.

import assert from "node:assert/strict";
import { test } from "node:test";

import { connected, reconnected, setup, subscribeFrames } from "./harness.mjs";

const msg = (id, channel = "room:1") => ({ type: "message", channel, id, data: { n: id }, ts: 1 });

test("a rewind is sent with the subscribe and its messages come before live ones", async () => {
  const ctx = setup();
  const seen = [];
  const subscribed = ctx.client.subscribe("room:1", (m) => seen.push(m.id), { rewind: { count: 50 } });
  const ws = await connected(ctx);
  assert.deepEqual(subscribeFrames(ws), [{ type: "subscribe", channel: "room:1", rewind: { count: 50 } }]);
  const answer = { type: "subscribed", channel: "room:1", position: "b", rewound: { count: 2, complete: true } };
  ws.receive(answer);
  assert.deepEqual(await subscribed, answer);
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  ws.receive(msg("c")); // live
  assert.deepEqual(seen, ["a", "b", "c"]);
  assert.equal(ctx.client.position("room:1"), "c");
});

test("a connection lost before the rewound messages asks for the rewind again, without since", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id), { rewind: { seconds: 60 } });
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "b", rewound: { count: 2, complete: false } });
  ws.serverClose(1012); // before "a" and "b" arrived
  ws = await reconnected(ctx);
  assert.deepEqual(subscribeFrames(ws), [{ type: "subscribe", channel: "room:1", rewind: { seconds: 60 } }]);
  ws.receive({ type: "subscribed", channel: "room:1", position: "b", rewound: { count: 2, complete: true } });
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  assert.deepEqual(seen, ["a", "b"]);
});

test("resubscribes send since and the rewind; after a gap the rewind delivers only what is new", async () => {
  const ctx = setup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id), { rewind: { count: 3 } });
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "a", rewound: { count: 1, complete: true } });
  ws.receive(msg("a"));
  ws.serverClose(1012);
  ws = await reconnected(ctx);
  assert.deepEqual(subscribeFrames(ws), [
    { type: "subscribe", channel: "room:1", since: "a", rewind: { count: 3 } },
  ]);
  ws.receive({ type: "subscribed", channel: "room:1", position: "b", recovered: true }); // no rewind
  ws.receive(msg("b"));
  ws.serverClose(1013);
  ws = await reconnected(ctx);
  assert.equal(subscribeFrames(ws)[0].since, "b");
  ws.receive({
    type: "subscribed", channel: "room:1", position: "d", recovered: false, rewound: { count: 3, complete: true },
  });
  assert.equal(ctx.client.position("room:1"), "b"); // not before the rewind is in
  ws.receive(msg("b")); // seen already: dropped
  ws.receive(msg("c"));
  ws.receive(msg("d"));
  assert.deepEqual(seen, ["a", "b", "c", "d"]);
  assert.equal(ctx.client.position("room:1"), "d");
  assert.equal(ctx.events.of("gap").length, 1);
});

test("a rewind whose messages were all seen already adopts the position at the pong", async () => {
  const ctx = setup();
  ctx.client.subscribe("room:1", () => {}, { rewind: { count: 2 } });
  let ws = await connected(ctx);
  ws.receive({ type: "subscribed", channel: "room:1", position: "b", rewound: { count: 2, complete: true } });
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  ws.serverClose(1013);
  ws = await reconnected(ctx);
  // A pod whose stream broke after "b": no id anchors a position there, so it names a time.
  ws.receive({
    type: "subscribed", channel: "room:1", position: "@77", recovered: false, rewound: { count: 2, complete: false },
  });
  ws.receive(msg("a"));
  ws.receive(msg("b"));
  assert.equal(ctx.client.position("room:1"), "b"); // duplicates move nothing
  ws.receive({ type: "pong", pod: "p" }); // the server answered the ping sent after the subscribe
  assert.equal(ctx.client.position("room:1"), "@77");
});

test("a subscribe without rewind sends none", async () => {
  const ctx = setup();
  ctx.client.subscribe("room:1", () => {}, { rewind: null });
  const ws = await connected(ctx);
  assert.deepEqual(subscribeFrames(ws), [{ type: "subscribe", channel: "room:1" }]);
});
