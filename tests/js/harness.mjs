// Builds a client wired to fakes; shared by the browser client's tests.

import { PubsockClient } from "../../web/pubsock.js";
import { FakeClock, fakeFetch, flush, recordEvents, socketClass } from "./fakes.mjs";

export const EVENTS = [
  "state",
  "pod",
  "recovered",
  "gap",
  "reconnecting",
  "error",
  "presence",
  "join",
  "leave",
  "refreshed",
  "subscribed",
  "unsubscribed",
  "transport",
];

export function setup(options = {}) {
  const clock = new FakeClock();
  const WS = socketClass();
  const fetch = options.fetch ?? fakeFetch();
  const client = new PubsockClient({
    url: "ws://pubsock.test/ws",
    apiBase: "http://api.test",
    WebSocket: WS,
    fetch,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    now: clock.now,
    random: () => 0.5,
    EventSource: null, // no SSE fallback unless a test gives one
    ...options,
  });
  const events = recordEvents(client, EVENTS);
  return { client, clock, WS, fetch, events };
}

/** Runs pending promise work until the client has created a socket; returns it (not yet open). */
export async function nextSocket(ctx, count) {
  const want = count ?? ctx.WS.instances.length + 1;
  for (let i = 0; i < 50 && ctx.WS.instances.length < want; i++) await flush(1);
  if (ctx.WS.instances.length < want) throw new Error("the client opened no new websocket");
  return ctx.WS.last;
}

/** connect() and open the first socket; returns it. */
export async function connected(ctx) {
  const done = ctx.client.connect();
  const ws = await nextSocket(ctx, 1);
  ws.open();
  await done;
  return ws;
}

/** Waits out a reconnect delay and opens the new socket. */
export async function reconnected(ctx) {
  const before = ctx.WS.instances.length;
  const delay = ctx.events.of("reconnecting").at(-1).delay;
  await ctx.clock.advance(delay);
  const ws = await nextSocket(ctx, before + 1);
  ws.open();
  return ws;
}

export function subscribeFrames(ws) {
  return ws.sentOf("subscribe");
}

/** Runs pending promise work until the client has opened an EventSource; returns it. */
export async function nextStream(ctx, count) {
  const want = count ?? ctx.ES.instances.length + 1;
  for (let i = 0; i < 50 && ctx.ES.instances.length < want; i++) await flush(1);
  if (ctx.ES.instances.length < want) throw new Error("the client opened no new event stream");
  return ctx.ES.last;
}
