// pubsock demo chat: signs in with a demo token, joins channel demo:<room>, shows messages,
// presence, which pod serves the tab, and every reconnect/recovery as it happens.
//
// Stable selectors for end-to-end tests (ids, data-testid in parentheses):
//   #join-form (join-form)              the sign-in form; hidden once joined
//     #name (name-input), #room (room-input), #join-button (join-button)
//     #join-error (join-error)          why sign-in failed (hidden when empty)
//   #chat (chat)                        the room; visible once joined
//     #room-title (room-title), #me (me): the room and the signed-in name
//     #leave-button (leave-button)      leaves the room (closes the connection)
//   #messages (message-list)            one <li data-testid="message"> per message:
//       data-id      the message id (the same id on every tab and every pod)
//       data-sub     the verified sender (frame `sub`), data-status "sending" | "delivered" | "failed"
//       .who (message-sender), .text (message-text), time (message-time, datetime = ISO publish time)
//     <li data-testid="gap-note">       shown where messages may be missing (recovered: false)
//   #message-input (message-input), #send-button (send-button), #send-error (send-error)
//   #connection (connection-state)      data-state = connecting | open | closed (also on <body>)
//     #connection-text (connection-text)
//   #pod (pod-indicator)                the name of the pod serving this tab
//   #presence-count (presence-count)    connections in the room (all pods), "–" until known
//   #presence-members (presence-members) one <li data-sub="name"> per member
//   #events (event-log)                 newest first; each <li data-event="..."> with one of
//       state, pod, transport, reconnecting, recovered, gap, subscribed, rewound, refreshed,
//       join, leave, error
//   window.pubsockDemo                  { client, channel, name } for scripted tests
//
// `?transport=sse` (or `websocket`) in the page's URL is passed to the client (default: auto,
// websockets with a fallback to Server-Sent Events).
//
// No build step: this file, demo.css and index.html are served as they are by the socket pods.

import { PubsockClient } from "/pubsock.js";

const $ = (id) => document.getElementById(id);
const NAME_RE = /^(?=.*\S)[A-Za-z0-9 ._-]{1,40}$/;
const ROOM_RE = /^[A-Za-z0-9_.@-]{1,100}$/;
const PRESENCE_POLL_MS = 15000;
const TRANSPORT = new URLSearchParams(location.search).get("transport") ?? "auto";
const EVENT_LOG_MAX = 200;
const MESSAGES_MAX = 500;
// Someone who joins sees the room's last messages (from the pod's history), then live ones.
const REWIND_COUNT = 50;

const state = {
  client: null,
  channel: null,
  name: null,
  members: new Set(),
  presenceTimer: null,
  presenceSoon: null,
};
window.pubsockDemo = state;

let config = { api_base: "" };
const configReady = fetch("/config.json", { cache: "no-store" })
  .then((r) => (r.ok ? r.json() : {}))
  .then((c) => {
    config = { ...config, ...c };
  })
  .catch(() => {});

// -- demo tokens ----------------------------------------------------------------------------

async function demoToken(name) {
  let response;
  try {
    response = await fetch("/demo/token", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name }),
    });
  } catch {
    throw new Error("The server cannot be reached.");
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 200 && typeof body.token === "string") return body.token;
  if (response.status === 404 || response.status === 405) {
    throw new Error("Demo sign-in is off on this server (it needs DEMO_TOKENS=1).");
  }
  const detail = typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`;
  throw new Error(`Sign-in failed: ${detail}`);
}

// -- rendering ------------------------------------------------------------------------------

function logEvent(kind, text) {
  const list = $("events");
  const item = document.createElement("li");
  item.dataset.event = kind;
  const time = document.createElement("time");
  const now = new Date();
  time.dateTime = now.toISOString();
  time.textContent = now.toLocaleTimeString();
  item.append(time, ` ${text}`);
  list.prepend(item);
  while (list.children.length > EVENT_LOG_MAX) list.lastElementChild.remove();
}

function setConnection(connState, text) {
  document.body.dataset.state = connState;
  $("connection").dataset.state = connState;
  $("connection-text").textContent = text;
}

function scrollToEnd() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function messageText(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return typeof data === "string" ? data : JSON.stringify(data);
}

function findMessage(id) {
  return $("messages").querySelector(`li[data-id="${CSS.escape(id)}"]`);
}

function renderMessage(item, { sub, data, ts, status }) {
  item.replaceChildren();
  item.dataset.testid = "message";
  item.dataset.status = status;
  if (sub) item.dataset.sub = sub;
  item.classList.toggle("mine", sub === state.name);
  const who = document.createElement("span");
  who.className = "who";
  who.dataset.testid = "message-sender";
  who.textContent = sub ?? "server";
  const text = document.createElement("span");
  text.className = "text";
  text.dataset.testid = "message-text";
  text.textContent = messageText(data);
  const time = document.createElement("time");
  time.dataset.testid = "message-time";
  const when = new Date(ts ?? Date.now());
  time.dateTime = when.toISOString();
  time.textContent = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  item.append(who, text, time);
  if (status !== "delivered") {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = status === "sending" ? "sending…" : "not sent";
    item.append(badge);
  }
}

function trimMessages() {
  const list = $("messages");
  while (list.children.length > MESSAGES_MAX) list.firstElementChild.remove();
}

function onMessage(frame) {
  // The client never delivers an id twice; a pending copy of our own message is replaced.
  findMessage(frame.id)?.remove();
  const item = document.createElement("li");
  item.dataset.id = frame.id;
  renderMessage(item, { sub: frame.sub, data: frame.data, ts: frame.ts, status: "delivered" });
  $("messages").append(item);
  trimMessages();
  scrollToEnd();
}

function note(kind, text) {
  const item = document.createElement("li");
  item.className = "note";
  item.dataset.testid = kind;
  item.textContent = text;
  $("messages").append(item);
  scrollToEnd();
}

function renderPresence(count) {
  if (count !== undefined) {
    $("presence-count").textContent = String(count);
    $("presence-unit").textContent = count === 1 ? "connection" : "connections";
  }
  const list = $("presence-members");
  const names = [...state.members].sort((a, b) => a.localeCompare(b));
  list.replaceChildren(
    ...names.map((name) => {
      const item = document.createElement("li");
      item.dataset.sub = name;
      item.textContent = name === state.name ? `${name} (you)` : name;
      return item;
    }),
  );
}

// -- presence -------------------------------------------------------------------------------

async function queryPresence() {
  const { client, channel } = state;
  if (!client || client.state !== "open") return;
  try {
    const frame = await client.presence(channel);
    if (client !== state.client) return;
    if (Array.isArray(frame.members)) state.members = new Set(frame.members.map((m) => m.sub));
    renderPresence(frame.count);
  } catch {
    /* no answer (older server, or reconnecting): join/leave events still update the list */
  }
}

function presenceSoon() {
  clearTimeout(state.presenceSoon);
  state.presenceSoon = setTimeout(queryPresence, 300);
}

// -- joining and leaving --------------------------------------------------------------------

function wire(client) {
  client.on("state", ({ state: s, code }) => {
    const text = { connecting: "connecting…", open: "connected", closed: "disconnected" }[s];
    setConnection(s, text);
    logEvent("state", code ? `${text} (close code ${code})` : text);
  });
  client.on("pod", ({ pod, via }) => {
    $("pod").textContent = pod;
    logEvent("pod", via === "http" ? `load balancer points to pod ${pod}` : `served by pod ${pod}`);
  });
  client.on("transport", ({ transport, reason }) => logEvent("transport", `using ${transport}: ${reason}`));
  client.on("reconnecting", ({ code, delay }) => {
    logEvent("reconnecting", `connection closed (${code}); reconnecting in ${(delay / 1000).toFixed(1)} s`);
  });
  client.on("subscribed", ({ channel, position, rewound }) => {
    logEvent("subscribed", `subscribed to ${channel} at ${position}`);
    if (rewound) {
      const what = rewound.count === 1 ? "1 earlier message" : `${rewound.count} earlier messages`;
      const whole = rewound.complete ? "" : " (this pod's history may not reach back further)";
      logEvent("rewound", `${what} of the room${whole}`);
    }
    state.members.add(state.name);
    renderPresence();
    presenceSoon();
  });
  client.on("recovered", ({ since }) => logEvent("recovered", `resumed after ${since}: nothing missed`));
  client.on("gap", ({ since }) => {
    logEvent("gap", `could not resume after ${since}: messages may be missing`);
    note("gap-note", "Some messages may be missing here (the connection was away too long).");
  });
  client.on("refreshed", ({ expires_at }) => {
    logEvent("refreshed", `token refreshed, valid until ${new Date(expires_at * 1000).toLocaleTimeString()}`);
  });
  client.on("join", ({ sub }) => {
    state.members.add(sub);
    renderPresence();
    logEvent("join", `${sub} joined`);
    presenceSoon();
  });
  client.on("leave", ({ sub }) => {
    if (sub !== state.name) state.members.delete(sub);
    renderPresence();
    logEvent("leave", `${sub} left`);
    presenceSoon();
  });
  client.on("presence", ({ count }) => renderPresence(count));
  client.on("error", ({ code, message }) => logEvent("error", `${code}: ${message}`));
}

async function join(event) {
  event.preventDefault();
  const name = $("name").value.trim();
  const room = $("room").value.trim();
  const error = $("join-error");
  error.hidden = true;
  $("name").removeAttribute("aria-invalid");
  $("room").removeAttribute("aria-invalid");
  if (!NAME_RE.test(name)) {
    return showJoinError("name", "Choose a name of up to 40 letters, digits, spaces, dots, dashes or underscores.");
  }
  if (!ROOM_RE.test(room)) {
    return showJoinError("room", "Room names use letters, digits and _ . @ - only.");
  }
  $("join-button").disabled = true;
  try {
    const token = await demoToken(name);
    await configReady;
    state.name = name;
    state.channel = `demo:${room}`;
    state.members = new Set([name]);
    const client = new PubsockClient({
      token,
      getToken: () => demoToken(name),
      apiBase: config.api_base || "",
      transport: TRANSPORT,
    });
    state.client = client;
    wire(client);
    $("messages").replaceChildren();
    $("events").replaceChildren();
    $("presence-count").textContent = "–";
    renderPresence();
    $("room-title").textContent = `Room ${room}`;
    $("me").textContent = name;
    client.subscribe(state.channel, onMessage, { presence: true, rewind: { count: REWIND_COUNT } }).catch((e) => {
      logEvent("error", `cannot subscribe: ${e.message}`);
    });
    client.connect();
    state.presenceTimer = setInterval(queryPresence, PRESENCE_POLL_MS);
    $("join-form").hidden = true;
    $("chat").hidden = false;
    $("message-input").focus();
    history.replaceState(null, "", `#${encodeURIComponent(room)}`);
  } catch (e) {
    showJoinError(null, e.message);
  } finally {
    $("join-button").disabled = false;
  }
}

function showJoinError(field, text) {
  const error = $("join-error");
  error.textContent = text;
  error.hidden = false;
  if (field) {
    $(field).setAttribute("aria-invalid", "true");
    $(field).focus();
  }
}

function leave() {
  state.client?.close();
  state.client = null;
  clearInterval(state.presenceTimer);
  clearTimeout(state.presenceSoon);
  setConnection("closed", "not connected");
  $("pod").textContent = "–";
  $("chat").hidden = true;
  $("join-form").hidden = false;
  $("name").focus();
}

async function send(event) {
  event.preventDefault();
  const input = $("message-input");
  const text = input.value.trim();
  const { client, channel } = state;
  if (!text || !client) return;
  input.value = "";
  $("send-error").hidden = true;
  const id = crypto.randomUUID();
  const item = document.createElement("li");
  item.dataset.id = id;
  renderMessage(item, { sub: state.name, data: { text }, ts: Date.now(), status: "sending" });
  $("messages").append(item);
  scrollToEnd();
  try {
    await client.publish(channel, { text }, { id });
  } catch (e) {
    const pending = findMessage(id);
    if (pending && pending.dataset.status === "sending") {
      renderMessage(pending, { sub: state.name, data: { text }, ts: Date.now(), status: "failed" });
    }
    const error = $("send-error");
    error.textContent = `Not sent: ${e.message}`;
    error.hidden = false;
  }
}

$("join-form").addEventListener("submit", join);
$("send-form").addEventListener("submit", send);
$("leave-button").addEventListener("click", leave);
if (location.hash.length > 1) $("room").value = decodeURIComponent(location.hash.slice(1));
$("name").focus();
