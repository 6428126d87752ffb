// Server-Sent Events: the fallback from websockets, one stream for every channel, positions from
// event ids, resume after a close or a cut, reopening on subscription and token changes,
// presence over HTTP.

import assert from "node:assert/strict";
import { test } from "node:test";

import { formatEventId, parseEventId } from "../../web/pubsock.js";
import { eventSourceClass, fakeFetch, flush, makeToken, response } from "./fakes.mjs";
import { nextSocket, nextStream, setup } from "./harness.mjs";

const START_S = 1_700_000_000;
const msg = (id, channel = "room:1") => ({ type: "message", channel, id, data: { n: id }, ts: 1 });
const subscribed = (channel, position, recovered) => ({
  type: "subscribed",
  channel,
  position,
  ...(recovered === undefined ? {} : { recovered }),
});

function sseSetup(options = {}) {
  const ES = eventSourceClass();
  const ctx = setup({ transport: "sse", EventSource: ES, ...options });
  ctx.ES = ES;
  return ctx;
}

/** connect() and open the first stream; the server's first events name the pod and channels. */
async function streaming(ctx, channels = ["room:1"], pod = "pod-a") {
  const done = ctx.client.connect();
  const es = await nextStream(ctx, 1);
  es.open();
  await done;
  const id = formatEventId(channels.map((c) => [c, "@1000"]));
  es.emit("pod", { type: "pod", pod }, id);
  for (const channel of channels) es.emit("subscribed", subscribed(channel, "@1000"));
  return es;
}

test("event ids are <channel>=<position> pairs", () => {
  const id = formatEventId([["room:1", "01HV"], ["a.b@c", "@17"]]);
  assert.equal(id, "room:1=01HV,a.b@c=@17");
  assert.deepEqual([...parseEventId(id)], [["room:1", "01HV"], ["a.b@c", "@17"]]);
  for (const bad of ["", "room:1", "=x", "room:1=", null, 7]) assert.equal(parseEventId(bad), null);
});

test("one stream carries every channel, the token and the presence channels", async () => {
  const token = makeToken({ sub: "ada", exp: START_S + 3600 });
  const ctx = sseSetup({ token });
  const seen = [];
  const first = ctx.client.subscribe("room:1", (m) => seen.push(m.id), { presence: true });
  ctx.client.subscribe("room:2", (m) => seen.push(m.id));
  const es = await streaming(ctx, ["room:1", "room:2"]);
  assert.equal(ctx.WS.instances.length, 0);
  assert.equal(ctx.client.transport, "sse");
  assert.ok(es.url.startsWith("ws://pubsock.test/sse?".replace("ws:", "http:")), es.url);
  assert.equal(es.params.get("channels"), "room:1,room:2");
  assert.equal(es.params.get("presence"), "room:1");
  assert.equal(es.params.get("token"), token);
  assert.equal(es.params.get("last_event_id"), null);
  assert.ok(es.withCredentials);
  assert.deepEqual(await first, subscribed("room:1", "@1000"));
  // The warm-up's header first (the load balancer's choice), then the stream's own word.
  assert.deepEqual(ctx.events.of("pod"), [
    { pod: "pod-a", via: "http" },
    { pod: "pod-a", via: "sse" },
  ]);
  es.emit("message", msg("a"), "room:1=a,room:2=@1000");
  es.emit("message", msg("b", "room:2"), "room:1=a,room:2=b");
  es.emit("join", { type: "join", channel: "room:1", sub: "bob" });
  assert.deepEqual(seen, ["a", "b"]);
  assert.deepEqual(ctx.events.of("join"), [{ type: "join", channel: "room:1", sub: "bob" }]);
  assert.equal(ctx.client.position("room:1"), "a");
  assert.equal(ctx.client.position("room:2"), "b");
  assert.deepEqual(ctx.events.of("state").map((e) => e.state), ["connecting", "open"]);
});

test("a drain's close event reconnects at once with every position, nothing twice", async () => {
  const ctx = sseSetup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  ctx.client.subscribe("room:2", (m) => seen.push(m.id));
  let es = await streaming(ctx, ["room:1", "room:2"]);
  es.emit("message", msg("a"), "room:1=a,room:2=@1000");
  es.emit("close", { type: "close", code: 1012, reason: "server restarting" });
  assert.ok(es.closed, "the client closes it: the browser must not reconnect on its own");
  const reconnecting = ctx.events.of("reconnecting");
  assert.deepEqual(reconnecting.map((e) => [e.code, e.delay]), [[1012, 0]]);
  await ctx.clock.advance(0);
  es = await nextStream(ctx, 2);
  assert.equal(es.params.get("last_event_id"), "room:1=a,room:2=@1000");
  es.open();
  es.emit("pod", { type: "pod", pod: "pod-b" }, "room:1=a,room:2=@1000");
  es.emit("subscribed", subscribed("room:2", "x", true));
  es.emit("subscribed", subscribed("room:1", "c", true));
  es.emit("message", msg("a"), "room:1=a,room:2=@1000"); // already seen: dropped
  es.emit("message", msg("c"), "room:1=c,room:2=@1000");
  es.emit("message", msg("x", "room:2"), "room:1=c,room:2=x");
  assert.deepEqual(seen, ["a", "c", "x"]);
  assert.deepEqual(
    ctx.events.of("recovered").map((e) => [e.channel, e.since]),
    [
      ["room:2", "@1000"],
      ["room:1", "a"],
    ],
  );
  assert.deepEqual(ctx.events.of("pod").at(-1), { pod: "pod-b", via: "sse" });
});

test("a recovered channel keeps its old position until the replay moves it", async () => {
  const ctx = sseSetup();
  ctx.client.subscribe("room:1", () => {});
  let es = await streaming(ctx);
  es.emit("message", msg("a"), "room:1=a");
  es.end(); // the pod died: no close event
  assert.equal(ctx.events.of("reconnecting").at(-1).code, 1006);
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  es = await nextStream(ctx, 2);
  es.open();
  es.emit("pod", { type: "pod", pod: "pod-b" }, "room:1=a");
  es.emit("subscribed", subscribed("room:1", "c", true)); // the replay (b, c) follows
  assert.equal(ctx.client.position("room:1"), "a");
  es.end(); // cut mid-replay
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  es = await nextStream(ctx, 3);
  assert.equal(es.params.get("last_event_id"), "room:1=a");
});

test("recovered: false is a gap and the event id's position is adopted", async () => {
  const ctx = sseSetup();
  ctx.client.subscribe("room:1", () => {});
  let es = await streaming(ctx);
  es.emit("message", msg("a"), "room:1=a");
  es.emit("close", { type: "close", code: 1013, reason: "too slow to keep up" });
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  es = await nextStream(ctx, 2);
  es.open();
  es.emit("pod", { type: "pod", pod: "pod-a" }, "room:1=a");
  es.emit("subscribed", subscribed("room:1", "z", false), "room:1=z");
  assert.deepEqual(ctx.events.of("gap"), [{ channel: "room:1", since: "a", position: "z" }]);
  assert.equal(ctx.client.position("room:1"), "z");
});

test("subscription changes reopen the stream once, resuming the channels it had", async () => {
  const ctx = sseSetup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id));
  let es = await streaming(ctx);
  es.emit("message", msg("a"), "room:1=a");
  const second = ctx.client.subscribe("room:2", (m) => seen.push(m.id));
  ctx.client.subscribe("room:3", () => {});
  await ctx.clock.advance(0);
  assert.ok(es.closed);
  es = await nextStream(ctx, 2);
  assert.equal(ctx.ES.instances.length, 2, "one reopen for both subscribes");
  assert.equal(es.params.get("channels"), "room:1,room:2,room:3");
  assert.equal(es.params.get("last_event_id"), "room:1=a");
  es.open();
  es.emit("pod", { type: "pod", pod: "pod-a" }, "room:1=a,room:2=@5,room:3=@5");
  es.emit("subscribed", subscribed("room:2", "@5"));
  es.emit("subscribed", subscribed("room:3", "@5"));
  es.emit("subscribed", subscribed("room:1", "a", true), "room:1=a,room:2=@5,room:3=@5");
  assert.deepEqual(await second, subscribed("room:2", "@5"));
  assert.equal(ctx.events.of("recovered").length, 0, "a reopen of our own is not a recovery");
  assert.deepEqual(
    ctx.events.of("subscribed").map((f) => f.channel),
    ["room:1", "room:2", "room:3"],
  );
  assert.deepEqual(ctx.events.of("state").map((e) => e.state), ["connecting", "open"]);
  es.emit("message", msg("b", "room:2"), "room:1=a,room:2=b,room:3=@5");
  assert.deepEqual(seen, ["a", "b"]);
  ctx.client.unsubscribe("room:2");
  ctx.client.unsubscribe("room:3");
  await ctx.clock.advance(0);
  es = await nextStream(ctx, 3);
  assert.equal(es.params.get("channels"), "room:1");
  assert.equal(es.params.get("last_event_id"), "room:1=a");
  ctx.client.unsubscribe("room:1");
  await ctx.clock.advance(0);
  assert.ok(es.closed);
  assert.equal(ctx.ES.instances.length, 3, "no channel: no stream");
  assert.equal(ctx.client.state, "open");
});

test("websockets that cannot connect fall back to a stream", async () => {
  const ES = eventSourceClass();
  const ctx = setup({ EventSource: ES, sseFallbackAfter: 2 });
  ctx.ES = ES;
  ctx.client.subscribe("room:1", () => {});
  const done = ctx.client.connect();
  (await nextSocket(ctx, 1)).fail();
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  (await nextSocket(ctx, 2)).fail();
  assert.deepEqual(ctx.events.of("transport"), [
    { transport: "sse", reason: "the websocket failed 2 times in a row" },
  ]);
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  const es = await nextStream(ctx, 1);
  es.open();
  await done;
  assert.equal(ctx.client.transport, "sse");
  assert.equal(ctx.WS.instances.length, 2);
  assert.equal(es.params.get("channels"), "room:1");
});

test("without EventSource (or with transport: websocket) there is no fallback", async () => {
  for (const options of [{}, { transport: "websocket", EventSource: eventSourceClass() }]) {
    const ctx = setup(options);
    ctx.client.connect();
    for (let i = 1; i <= 4; i++) {
      (await nextSocket(ctx, i)).fail();
      await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
    }
    assert.equal(ctx.client.transport, "websocket");
    assert.equal(ctx.events.of("transport").length, 0);
    ctx.client.close();
  }
});

test("the stream is reopened with a fresh token before expiry", async () => {
  const tokens = [
    makeToken({ sub: "ada", exp: START_S + 600, n: 1 }),
    makeToken({ sub: "ada", exp: START_S + 1200, n: 2 }),
  ];
  let issued = 0;
  const ctx = sseSetup({ getToken: async () => tokens[issued++], refreshMarginMs: 60000 });
  ctx.client.subscribe("room:1", () => {});
  let es = await streaming(ctx);
  assert.equal(es.params.get("token"), tokens[0]);
  es.emit("message", msg("a"), "room:1=a");
  await ctx.clock.advance(540000);
  es = await nextStream(ctx, 2);
  assert.equal(es.params.get("token"), tokens[1]);
  assert.equal(es.params.get("last_event_id"), "room:1=a");
  assert.deepEqual(ctx.events.of("refreshed"), [{ expires_at: START_S + 1200 }]);
  assert.equal(ctx.events.of("reconnecting").length, 0);
});

test("a 1008 close fetches a new token before the next stream", async () => {
  const tokens = [makeToken({ sub: "ada", exp: START_S + 3600, n: 1 }), makeToken({ sub: "ada", exp: START_S + 7200, n: 2 })];
  let issued = 0;
  const ctx = sseSetup({ getToken: async () => tokens[issued++] });
  ctx.client.subscribe("room:1", () => {});
  let es = await streaming(ctx);
  es.emit("close", { type: "close", code: 1008, reason: "token expired" });
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  es = await nextStream(ctx, 2);
  assert.equal(es.params.get("token"), tokens[1]);
});

test("a stream that never opens counts as a failed handshake", async () => {
  const tokens = [1, 2, 3, 4].map((n) => makeToken({ sub: "ada", exp: START_S + 3600, n }));
  let issued = 0;
  const ctx = sseSetup({ getToken: async () => tokens[issued++], tokenRefetchAfterFailures: 2 });
  ctx.client.subscribe("room:1", () => {});
  ctx.client.connect();
  (await nextStream(ctx, 1)).end();
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  const second = await nextStream(ctx, 2);
  assert.equal(second.params.get("token"), tokens[0]);
  second.end();
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  assert.equal((await nextStream(ctx, 3)).params.get("token"), tokens[1]);
});

test("a refused stream reports the server's reason once and rejects the waiting subscribes", async () => {
  const detail = "this stream could not resume: ... the first 41 of these channels fit one stream";
  const fetch = fakeFetch((url) => (String(url).includes("/sse?") ? response(400, { detail }) : null));
  const ctx = sseSetup({ fetch });
  const waiting = ctx.client.subscribe("room:1", () => {});
  ctx.client.connect();
  (await nextStream(ctx, 1)).end();
  await assert.rejects(waiting, (error) => error.code === "refused" && error.message === detail);
  assert.deepEqual(ctx.events.of("error"), [{ code: "refused", status: 400, message: detail }]);
  const asked = fetch.calls.find((c) => String(c.url).includes("/sse?"));
  assert.equal(asked.url, ctx.ES.instances[0].url); // the very request the EventSource made
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  (await nextStream(ctx, 2)).end(); // refused again: reconnects go on, said once
  await flush(10);
  assert.equal(ctx.events.of("error").length, 1);
  assert.equal(fetch.calls.filter((c) => String(c.url).includes("/sse?")).length, 2);
});

test("a stream that failed for a reason that passes (503, network) reports nothing", async () => {
  const fetch = fakeFetch((url) =>
    String(url).includes("/sse?") ? response(503, { detail: "draining" }, { "Retry-After": "5" }) : null,
  );
  const ctx = sseSetup({ fetch });
  ctx.client.subscribe("room:1", () => {});
  ctx.client.connect();
  (await nextStream(ctx, 1)).end();
  await flush(10);
  assert.equal(fetch.calls.filter((c) => String(c.url).includes("/sse?")).length, 1);
  assert.deepEqual(ctx.events.of("error"), []);
  await ctx.clock.advance(ctx.events.of("reconnecting").at(-1).delay);
  await nextStream(ctx, 2);
});

test("presence queries go over HTTP with the token", async () => {
  const token = makeToken({ sub: "ada", exp: START_S + 3600 });
  const frame = { type: "presence", channel: "room:1", count: 2, members: [{ sub: "ada" }] };
  const fetch = fakeFetch((url) => {
    if (String(url).includes("/sse/presence")) return response(200, frame);
    return null;
  });
  const ctx = sseSetup({ token, fetch });
  ctx.client.subscribe("room:1", () => {});
  await streaming(ctx);
  assert.deepEqual(await ctx.client.presence("room:1"), frame);
  const call = fetch.calls.find((c) => String(c.url).includes("/sse/presence"));
  assert.equal(call.url, "http://pubsock.test/sse/presence?channel=room%3A1");
  assert.equal(call.init.headers.Authorization, `Bearer ${token}`);
  assert.deepEqual(ctx.events.of("presence"), [frame]);
});

test("rewinds go in the stream's query, for the channels that ask", async () => {
  const ctx = sseSetup();
  const seen = [];
  ctx.client.subscribe("room:1", (m) => seen.push(m.id), { rewind: { count: 20 } });
  ctx.client.subscribe("room:2", (m) => seen.push(m.id), { rewind: { count: 50, seconds: 60 } });
  ctx.client.subscribe("room:3", () => {});
  ctx.client.connect();
  const es = await nextStream(ctx, 1);
  assert.equal(es.params.get("rewind_count"), "50");
  assert.equal(es.params.get("rewind_seconds"), "60");
  assert.equal(es.params.get("rewind_channels"), "room:1,room:2");
  es.open();
  es.emit("pod", { type: "pod", pod: "pod-a" }, "room:2=@5,room:3=@5"); // room:1: rewinding
  es.emit("subscribed", { ...subscribed("room:1", "r2"), rewound: { count: 2, complete: true } });
  assert.equal(ctx.client.position("room:1"), null, "not before the rewind is in");
  es.emit("message", msg("r1"), "room:1=r1,room:2=@5,room:3=@5");
  es.emit("message", msg("r2"), "room:1=r2,room:2=@5,room:3=@5");
  es.emit("subscribed", { ...subscribed("room:2", "@5"), rewound: { count: 0, complete: true } });
  es.emit("subscribed", subscribed("room:3", "@5"));
  assert.deepEqual(seen, ["r1", "r2"]);
  assert.equal(ctx.client.position("room:1"), "r2");
  assert.equal(ctx.client.position("room:2"), "@5");
});
