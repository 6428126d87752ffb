// Publishing through the HTTP API: auth, retries of 5xx with the same id, errors.

import assert from "node:assert/strict";
import { test } from "node:test";

import { PublishError } from "../../web/pubsock.js";
import { fakeFetch, makeToken, response } from "./fakes.mjs";
import { setup } from "./harness.mjs";

const token = makeToken({ sub: "ada", exp: 1_700_003_600 });

test("publish posts data and id with the bearer token", async () => {
  const fetch = fakeFetch((url, init) =>
    response(202, { id: JSON.parse(init.body).id, channel: "demo:lobby" }),
  );
  const ctx = setup({ fetch, token, configUrl: null });
  const result = await ctx.client.publish("demo:lobby", { text: "hi" }, { id: "m-1" });
  assert.deepEqual(result, { id: "m-1", channel: "demo:lobby" });
  const [call] = fetch.calls;
  assert.equal(call.url, "http://api.test/v1/channels/demo:lobby/messages");
  assert.equal(call.init.method, "POST");
  assert.equal(call.init.headers.Authorization, `Bearer ${token}`);
  assert.equal(call.init.headers["Content-Type"], "application/json");
  assert.deepEqual(call.body, { data: { text: "hi" }, id: "m-1" });
});

test("publish makes up a UUID id when none is given", async () => {
  const fetch = fakeFetch((url, init) => response(202, { id: JSON.parse(init.body).id }));
  const ctx = setup({ fetch, configUrl: null });
  const { id } = await ctx.client.publish("demo:lobby", 1);
  assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/);
  assert.equal(fetch.calls[0].init.headers.Authorization, undefined);
});

test("a 503 is retried with the same id after Retry-After", async () => {
  let n = 0;
  const fetch = fakeFetch(() =>
    ++n <= 2
      ? response(503, { detail: "broker unavailable", id: "m-1" }, { "Retry-After": "2" })
      : response(202, { id: "m-1", channel: "demo:x" }),
  );
  const ctx = setup({ fetch, token, configUrl: null });
  let result = null;
  const done = ctx.client.publish("demo:x", "hello", { id: "m-1" }).then((r) => (result = r));
  await ctx.clock.advance(1999);
  assert.equal(fetch.calls.length, 1);
  assert.equal(result, null);
  await ctx.clock.advance(1);
  assert.equal(fetch.calls.length, 2);
  await ctx.clock.advance(2000);
  await done;
  assert.deepEqual(result, { id: "m-1", channel: "demo:x" });
  assert.deepEqual(
    fetch.calls.map((c) => c.body.id),
    ["m-1", "m-1", "m-1"],
  );
});

test("network errors are retried with the same id, with backoff", async () => {
  let n = 0;
  const fetch = fakeFetch(() => {
    if (++n === 1) throw new TypeError("network down");
    return response(202, { id: "m-9" });
  });
  const ctx = setup({ fetch, configUrl: null, random: () => 0.5, backoffBaseMs: 1000 });
  const done = ctx.client.publish("demo:x", 1, { id: "m-9" });
  await ctx.clock.advance(500);
  assert.deepEqual(await done, { id: "m-9", channel: "demo:x" });
  assert.deepEqual(
    fetch.calls.map((c) => c.body.id),
    ["m-9", "m-9"],
  );
});

test("a 503 that persists ends in a PublishError after the retries", async () => {
  const fetch = fakeFetch(() => response(503, { detail: "broker unavailable", id: "m-2" }));
  const ctx = setup({ fetch, configUrl: null, random: () => 0 });
  const done = ctx.client.publish("demo:x", 1, { id: "m-2", retries: 2 });
  const outcome = assert.rejects(done, (error) => {
    assert.ok(error instanceof PublishError);
    assert.equal(error.status, 503);
    assert.equal(error.id, "m-2");
    return true;
  });
  await ctx.clock.advance(10);
  await outcome;
  assert.equal(fetch.calls.length, 3);
});

test("4xx answers are errors, never retried", async () => {
  for (const [status, detail] of [
    [403, "not allowed on this channel"],
    [413, "data too large"],
    [422, [{ loc: ["body", "id"], msg: "bad id" }]],
    [429, "rate limited"],
  ]) {
    const fetch = fakeFetch(() => response(status, { detail }, { "Retry-After": "3" }));
    const ctx = setup({ fetch, token, configUrl: null });
    await assert.rejects(ctx.client.publish("demo:x", 1, { id: "m-3" }), (error) => {
      assert.ok(error instanceof PublishError);
      assert.equal(error.status, status);
      assert.deepEqual(error.detail, detail);
      assert.equal(error.id, "m-3");
      assert.equal(error.retryAfterMs, 3000);
      return true;
    });
    assert.equal(fetch.calls.length, 1);
  }
});

test("a 401 fetches a new token once and retries", async () => {
  const fresh = makeToken({ sub: "ada", exp: 1_700_007_200 });
  const fetch = fakeFetch((url, init) =>
    init.headers.Authorization === `Bearer ${fresh}`
      ? response(202, { id: "m-4" })
      : response(401, { detail: "token expired" }),
  );
  const ctx = setup({ fetch, token, getToken: async () => fresh, configUrl: null });
  assert.deepEqual(await ctx.client.publish("demo:x", 1, { id: "m-4" }), {
    id: "m-4",
    channel: "demo:x",
  });
  assert.equal(fetch.calls.length, 2);

  const denied = fakeFetch(() => response(401, { detail: "bad token" }));
  const ctx2 = setup({ fetch: denied, token, getToken: async () => fresh, configUrl: null });
  await assert.rejects(ctx2.client.publish("demo:x", 1), { status: 401 });
  assert.equal(denied.calls.length, 2);
});
