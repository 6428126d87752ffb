import { PubsockClient } from "/pubsock.js";

const $ = (id) => document.getElementById(id);
const config = await fetch("/config.json").then((r) => r.json()).catch(() => ({}));
let client = null;
let channel = null;
let me = null;
const seen = new Set();

function logEvent(text) {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").prepend(item);
}

function setState(state) {
  document.body.dataset.state = state;
  $("status-text").textContent = state === "open" ? "connected" : state;
}

function addMessage(frame) {
  if (seen.has(frame.id)) return; // never shown twice, whatever happens
  seen.add(frame.id);
  const data = frame.data ?? {};
  const item = document.createElement("li");
  item.dataset.id = frame.id;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = `${frame.sub ?? data.name ?? "someone"}: `;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = typeof data.text === "string" ? data.text : JSON.stringify(data);
  const time = document.createElement("time");
  const when = new Date(frame.ts);
  time.dateTime = when.toISOString();
  time.textContent = when.toLocaleTimeString();
  item.append(who, text, time);
  $("messages").append(item);
  $("messages").scrollTop = $("messages").scrollHeight;
}

function note(text) {
  const item = document.createElement("li");
  item.className = "note";
  item.textContent = text;
  $("messages").append(item);
}

$("join").addEventListener("submit", async (event) => {
  event.preventDefault();
  me = $("name").value.trim();
  channel = `demo:${$("room").value.trim()}`;
  client = new PubsockClient({ apiBase: config.api_base ?? "" });
  client.addEventListener("state", (e) => setState(e.detail.state));
  client.addEventListener("pod", (e) => { $("pod").textContent = e.detail.pod ?? "–"; });
  client.addEventListener("reconnecting", (e) => logEvent(`closed (${e.detail.code}), reconnecting in ${e.detail.delayMs} ms`));
  client.addEventListener("recovered", () => logEvent("resumed: nothing missed"));
  client.addEventListener("gap", () => { logEvent("could not prove nothing was missed"); note("Some messages may be missing."); });
  client.addEventListener("subscribed", (e) => logEvent(`subscribed at ${e.detail.position}`));
  client.subscribe(channel, addMessage, { presence: true });
  await client.connect();
  $("join").hidden = true;
  $("chat").hidden = false;
  $("room-title").textContent = `Room ${$("room").value.trim()}`;
  $("text").focus();
});

$("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value.trim();
  if (!text) return;
  $("text").value = "";
  try {
    await client.publish(channel, { name: me, text });
  } catch (error) {
    logEvent(String(error));
  }
});
