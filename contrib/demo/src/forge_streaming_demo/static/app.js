// The demo chat: rooms, who is here, typing, the transport badge and a live
// connection count, built only on the public client at /forge-streaming.js.
//
// URL parameters: ?transport=auto|webtransport|websocket|sse, ?room=<first room>,
// ?name=<display name>. `window.demo` exposes the client and an event log for
// poking around in devtools (and for the end-to-end tests).

import { ForgeStreamingClient } from "/forge-streaming.js";

const config = JSON.parse(document.getElementById("demo-config").textContent);
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const TYPING_SEND_EVERY = 2000; // ms between "still typing" notices while keys are pressed
const TYPING_IDLE = 3000; // ms without a key press before we say we stopped
const TYPING_EXPIRE = 6000; // ms after which someone else's typing is forgotten (a lost "stopped")
const STATS_EVERY = 2000;
const MAX_MESSAGES = 500; // per room, so a long session does not grow the page forever

// -- who we are ---------------------------------------------------------------------

function randomId() {
  // crypto.randomUUID exists only in secure contexts; the demo also runs on plain http://host:port.
  return globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

const name = (params.get("name") || localStorage.getItem("forge-demo-name") || `guest-${randomId().slice(0, 4)}`)
  .slice(0, 32);
localStorage.setItem("forge-demo-name", name);
$("name-input").value = name;

const transport = params.get("transport") || "auto";
$("transport-select").value = transport;

const client = new ForgeStreamingClient({
  transport,
  offered: config.transports,
  query: { guest: name },
});

/** room -> {messages: [], unread, typing: Map(userId -> timer)} */
const rooms = new Map();
let current = null;
/** Nonces of messages this page sent: shown at once, so their echo from a replay is skipped. */
const ownNonces = new Set();
const log = [];

window.demo = { client, rooms, log, name };

function display(userId) {
  if (!userId) return "?";
  const prefix = config.guestPrefix;
  const shown = prefix && userId.startsWith(prefix) ? userId.slice(prefix.length) : userId;
  return userId === client.userId ? `${shown} (you)` : shown;
}

function roomState(room) {
  let state = rooms.get(room);
  if (!state) {
    state = { messages: [], unread: 0, typing: new Map() };
    rooms.set(room, state);
  }
  return state;
}

// -- rendering ---------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "className") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children);
  return node;
}

function renderRooms() {
  const list = $("rooms");
  list.replaceChildren(...[...rooms.keys()].map((room) => {
    const state = rooms.get(room);
    const li = el("li", { className: room === current ? "current" : "", "data-room": room }, `#${room}`);
    const tail = el("span");
    if (state.unread) tail.append(el("span", { className: "unread" }, String(state.unread)));
    const leave = el("button", { type: "button", title: `leave #${room}` }, "×");
    leave.addEventListener("click", (e) => { e.stopPropagation(); leaveRoom(room); });
    tail.append(leave);
    li.append(tail);
    li.addEventListener("click", () => show(room));
    return li;
  }));
}

function renderUsers() {
  const users = current ? client.users(current).sort() : [];
  $("users").replaceChildren(...users.map((id) =>
    el("li", { className: id === client.userId ? "me" : "", "data-user": id }, display(id))));
}

function renderTyping() {
  const state = current && rooms.get(current);
  const who = state ? [...state.typing.keys()].map(display) : [];
  $("typing").textContent = who.length === 0 ? "" :
    `${who.join(", ")} ${who.length === 1 ? "is" : "are"} typing…`;
}

function messageItem(m) {
  const li = el("li", {
    className: [m.own ? "own" : "", m.pending ? "pending" : ""].join(" ").trim(),
    "data-user": m.userId || "", "data-nonce": m.nonce || "", "data-text": m.text,
  });
  li.append(el("span", { className: "author" }, display(m.userId)), el("span", { className: "text" }, m.text));
  if (m.time) li.append(el("span", { className: "time" }, m.time));
  m.node = li;
  return li;
}

function renderMessages() {
  const state = current && rooms.get(current);
  $("messages").replaceChildren(...(state ? state.messages.map(messageItem) : []));
  scrollDown();
}

function scrollDown() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function addMessage(room, m) {
  const state = roomState(room);
  state.messages.push(m);
  if (state.messages.length > MAX_MESSAGES) state.messages.shift();
  if (room === current) {
    $("messages").append(messageItem(m));
    if (state.messages.length >= MAX_MESSAGES) $("messages").firstElementChild?.remove();
    scrollDown();
  } else {
    state.unread += 1;
    renderRooms();
  }
}

function notice(text, event, room) {
  const li = el("li", { "data-event": event, "data-room": room || "" }, text);
  $("notices").append(li);
  // Keep the newest few; they say what happened to the connection, not history.
  while ($("notices").children.length > 4) $("notices").firstElementChild.remove();
}

function timeOf(timestamp) {
  const date = timestamp ? new Date(timestamp) : new Date();
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// -- rooms -------------------------------------------------------------------------

function show(room) {
  current = room;
  roomState(room).unread = 0;
  $("room-title").textContent = `#${room}`;
  history.replaceState(null, "", `?${new URLSearchParams({ ...Object.fromEntries(params), room })}`);
  renderRooms();
  renderUsers();
  renderMessages();
  renderTyping();
}

function joinRoom(room) {
  room = room.trim();
  if (!room) return;
  roomState(room);
  client.join(room);
  show(room);
}

function leaveRoom(room) {
  client.leave(room);
  rooms.delete(room);
  if (current === room) {
    const next = rooms.keys().next().value;
    if (next) show(next);
    else { current = null; $("room-title").textContent = "#"; renderMessages(); renderUsers(); renderRooms(); }
  } else {
    renderRooms();
  }
}

// -- typing ------------------------------------------------------------------------

let typingSentAt = 0;
let typingIdle = null;

function typingStopped() {
  clearTimeout(typingIdle);
  typingIdle = null;
  if (typingSentAt && current) client.typing(current, false);
  typingSentAt = 0;
}

$("message-input").addEventListener("input", () => {
  if (!current) return;
  if (Date.now() - typingSentAt > TYPING_SEND_EVERY) {
    client.typing(current, true);
    typingSentAt = Date.now();
  }
  clearTimeout(typingIdle);
  typingIdle = setTimeout(typingStopped, TYPING_IDLE);
});

// -- sending -----------------------------------------------------------------------

$("send-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = $("message-input");
  const text = input.value.trim();
  if (!text || !current) return;
  input.value = "";
  typingStopped();
  const nonce = randomId();
  ownNonces.add(nonce);
  // Shown at once; dimmed until the client has handed it to a connection
  // (it waits in the client's queue while disconnected).
  const m = { own: true, pending: true, userId: client.userId, text, nonce, time: timeOf() };
  addMessage(current, m);
  client.send(current, { text, nonce }).then(() => {
    m.pending = false;
    m.node?.classList.remove("pending");
  }, (err) => {
    m.node?.classList.add("failed");
    notice(`Not sent: ${err.message}`, "send-failed", current);
  });
});

$("join-form").addEventListener("submit", (e) => {
  e.preventDefault();
  joinRoom($("join-input").value);
  $("join-input").value = "";
});

$("name-form").addEventListener("submit", (e) => {
  e.preventDefault();
  // The name is part of the connection (?guest=), so a new one means a new page load.
  const next = new URLSearchParams(location.search);
  next.set("name", $("name-input").value.trim() || name);
  localStorage.setItem("forge-demo-name", next.get("name"));
  location.search = next.toString();
});

$("transport-select").addEventListener("change", (e) => {
  const next = new URLSearchParams(location.search);
  next.set("transport", e.target.value);
  location.search = next.toString();
});

// -- client events -----------------------------------------------------------------

function record(type) {
  client.addEventListener(type, (e) => log.push({ type, ...e.detail, frame: undefined }));
}
["state", "joined", "resync", "error", "system", "disconnected", "transport-failed"].forEach(record);

client.on("state", ({ state, transport: used, delay }) => {
  const badge = $("transport");
  badge.textContent = { webtransport: "WebTransport", websocket: "WebSocket", sse: "SSE" }[used] || "offline";
  badge.dataset.transport = used || "";
  $("state").dataset.state = state;
  $("state").textContent = state === "reconnecting" && delay !== undefined
    ? `reconnecting in ${(delay / 1000).toFixed(1)} s` : state;
  if (state === "open") refreshStats();
});

client.on("message", ({ room, userId, data, timestamp }) => {
  const nonce = data && typeof data === "object" ? data.nonce : undefined;
  if (nonce && ownNonces.has(nonce)) return; // our own message, replayed after a reconnect
  const text = data && typeof data === "object" ? String(data.text ?? JSON.stringify(data)) : String(data);
  addMessage(room, { userId, text, nonce, time: timeOf(timestamp) });
  const state = rooms.get(room);
  if (state?.typing.has(userId)) { clearTimeout(state.typing.get(userId)); state.typing.delete(userId); renderTyping(); }
});

client.on("presence", ({ room }) => {
  if (room === current) renderUsers();
  refreshStats();
});

client.on("joined", ({ room }) => {
  if (room === current) renderUsers();
});

client.on("typing", ({ room, userId, typing }) => {
  const state = rooms.get(room);
  if (!state) return;
  clearTimeout(state.typing.get(userId));
  if (typing) {
    state.typing.set(userId, setTimeout(() => { state.typing.delete(userId); renderTyping(); }, TYPING_EXPIRE));
  } else {
    state.typing.delete(userId);
  }
  if (room === current) renderTyping();
});

client.on("resync", ({ room }) => {
  notice(`#${room}: the server could not replay everything since you were last connected; ` +
    "some messages may be missing.", "resync", room);
});

client.on("disconnected", ({ reason }) => {
  notice(`Connection lost${reason ? ` (${reason})` : ""}; reconnecting…`, "disconnected");
});

client.on("error", ({ code, message }) => {
  notice(`${code}: ${message}`, "error");
});

// -- live connection count ---------------------------------------------------------

let statsTimer = null;

async function refreshStats() {
  clearTimeout(statsTimer);
  statsTimer = setTimeout(refreshStats, STATS_EVERY);
  // Only while connected: polling a server that is down would fill the console with failed requests.
  if (client.state !== "open") return;
  try {
    const response = await fetch("/demo/stats", { cache: "no-store" });
    if (!response.ok) return;
    const { connections, by_transport: byTransport } = await response.json();
    const parts = Object.entries(byTransport).filter(([, n]) => n).map(([t, n]) => `${t} ${n}`);
    const counter = $("connections");
    counter.dataset.count = String(connections);
    counter.textContent = `${connections} connection${connections === 1 ? "" : "s"}` +
      (parts.length ? ` (${parts.join(", ")})` : "");
  } catch {
    // The server went away between the check and the request; the next tick tries again.
  }
}

// -- start -------------------------------------------------------------------------

client.connect();
joinRoom(params.get("room") || config.defaultRoom);
