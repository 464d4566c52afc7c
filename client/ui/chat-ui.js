// chat-ui.js: the chat page a `chat` route serves with `ui on` (index.html).
//
// Rooms are the channels room:<name>. The page joins one room at a time, with
// its last 50 messages; caddychat.js reconnects and resumes, so a dropped
// connection costs no message on rooms with history. Everything that comes
// from the network (message text, user names, error messages) is put into
// the page with textContent, never parsed as HTML; the page's Content-Security-Policy
// forbids inline code on top of that.

import { CaddyChat, DISCONNECTED_BY_SERVER, OwnMessages, TOKEN_REVOKED, describeGap } from "./caddychat.js";

const HISTORY = 50; // messages shown on joining a room
const MAX_SHOWN = 500; // messages kept in the page; older ones are dropped
const MAX_ROOMS = 8; // recent rooms listed
const TOKEN_KEY = "caddychat.token"; // sessionStorage: this tab only
const ROOMS_KEY = "caddychat.rooms"; // localStorage
const TYPING_EVERY = 2000; // ms between this page's typing events
const TYPING_SHOWN = 4000; // ms another user stays "typing" after its last event
const NAME_KEY = "caddychat.name"; // sessionStorage: a guest name per tab
const OWN_KEY = "caddychat.own"; // sessionStorage: this tab's message and guest ids
// A guest name as the server takes it (guest_names; guest.go): 1 to 24
// letters, digits, marks (not first), single inner spaces and _ - . '.
const GUEST_NAME = /^(?=.*[\p{L}\p{Nd}])[\p{L}\p{Nd}_.'-][\p{L}\p{Mn}\p{Mc}\p{Nd}_.'-]*(?: [\p{L}\p{Mn}\p{Mc}\p{Nd}_.'-]+)*$/u;
// A channel name is at most 128 bytes of these characters (PROTOCOL.md); "room:" takes 5.
const ROOM_NAME = /^[A-Za-z0-9_.:@/-]{1,123}$/;

const STATE_TEXT = {
  connecting: "connecting…",
  connected: "connected",
  reconnecting: "reconnecting…",
  closed: "disconnected",
};

// How the status line names the transport in use (caddychat.js falls back to
// server-sent events where no WebSocket gets through).
const TRANSPORT_TEXT = {
  websocket: "WebSocket",
  sse: "SSE",
};
const TRANSPORT_TITLE = {
  websocket: "over a WebSocket",
  sse: "over server-sent events (WebSocket is blocked or broken on the way): messages are sent with HTTP POSTs",
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  roomTitle: $("room-title"),
  joinForm: $("join-form"),
  room: $("room"),
  rooms: $("rooms"),
  online: $("online"),
  onlineCount: $("online-count"),
  presenceNote: $("presence-note"),
  auth: $("auth"),
  nameForm: $("name-form"),
  name: $("name"),
  whoami: $("whoami"),
  tokenForm: $("token-form"),
  token: $("token"),
  tokenClear: $("token-clear"),
  messages: $("messages"),
  sendForm: $("send-form"),
  text: $("text"),
  typing: $("typing"),
};

const base = document.querySelector('meta[name="caddychat-base"]')?.content ?? "";
const wsURL = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + base;

let chat = null; // the current client; events of replaced ones are ignored
let channel = null; // the room's channel, room:<name>
let joinSeq = 0; // bumped on every join, so late answers for an earlier room are dropped
let removed = false; // the server unsubscribed this page from the room: joining it again is allowed
let user = ""; // the authenticated user, "" when anonymous
let guest = ""; // this connection's guest id (routes with guest_names), "" otherwise
let presenceOn = null; // null until the route answered the presence op
const present = new Map(); // presence key ("u:<user>" or "g:<guest id>") → {user, guest, name}
const typers = new Map(); // presence key → {name, until}: who is typing in the room
let typingSent = 0; // when this page last said it was typing

// ---- storage (may be unavailable: private modes, sandboxed frames) ----

function load(storage, key, fallback) {
  try {
    return globalThis[storage].getItem(key) ?? fallback;
  } catch {
    return fallback;
  }
}

function save(storage, key, value) {
  try {
    if (value === null) globalThis[storage].removeItem(key);
    else globalThis[storage].setItem(key, value);
  } catch {
    // Not kept: the page still works for this visit.
  }
}

const readToken = () => load("sessionStorage", TOKEN_KEY, "").trim();
const readName = () => load("sessionStorage", NAME_KEY, "").trim();

// Which messages are this tab's own, across reloads: kept in sessionStorage,
// from what the server said only (the ok of a publish, the welcome).
const own = new OwnMessages({
  storage: { getItem: (key) => load("sessionStorage", key, null), setItem: (key, value) => save("sessionStorage", key, value) },
  key: OWN_KEY,
});

function validGuestName(name) {
  return [...name].length <= 24 && new TextEncoder().encode(name).length <= 64 && GUEST_NAME.test(name);
}

// The route's URL with the guest name, when this tab has one and no token
// (a token's user wins; the server ignores the name then).
function connectURL() {
  const name = readName();
  return name && !readToken() ? `${wsURL}?name=${encodeURIComponent(name)}` : wsURL;
}

function recentRooms() {
  try {
    const list = JSON.parse(load("localStorage", ROOMS_KEY, "[]"));
    return Array.isArray(list) ? list.filter((r) => typeof r === "string" && ROOM_NAME.test(r)) : [];
  } catch {
    return [];
  }
}

// ---- connection ----

function connect() {
  const client = new CaddyChat(connectURL(), { token: () => readToken() || null });
  chat = client;
  const current = (fn) => (arg) => client === chat && fn(arg);
  client.on("state", current(showState));
  client.on("transport", current(onTransport));
  client.on("welcome", current(onWelcome));
  client.on("disconnect", current(onDisconnect));
  client.on("presence", current(onPresenceEvent));
  // Join and leave events missed while away: ask again.
  client.on("resubscribed", current(({ channel: ch }) => ch === channel && refreshPresence()));
  client.on("gap", current(onGap));
  client.on("subscribed", current(onServerSubscribed));
  client.on("unsubscribed", current(onServerUnsubscribed));
  client.on("error", current(onError));
  showState(client.state);
}

function showState(state) {
  const transport = chat?.transport ?? "";
  ui.status.dataset.state = state;
  ui.status.dataset.transport = transport;
  const over = TRANSPORT_TEXT[transport];
  ui.status.textContent = (STATE_TEXT[state] ?? state) + (over && state !== "closed" ? ` · ${over}` : "");
}

// The client moved to another transport: the status line says which.
function onTransport({ transport }) {
  showState(chat.state);
  if (transport === "sse") notice("WebSocket connections do not get through here: using server-sent events instead.");
}

// The status line's tooltip: the node, and the transport.
function statusTitle(node) {
  const over = TRANSPORT_TITLE[chat?.transport] ?? "";
  return [node ? `node ${node}` : "", over].filter(Boolean).join(", ");
}

function onWelcome(w) {
  user = w.user || "";
  guest = (!user && typeof w.guest === "string" && w.guest) || "";
  own.welcome(w);
  ui.status.dataset.node = w.node || "";
  ui.status.title = statusTitle(w.node);
  showState(chat.state);
  ui.whoami.textContent = user ? `· ${user}` : guest && w.name ? `· ${w.name} (guest)` : "· anonymous";
  // The route lets guests pick a name: offer it (a token's user needs none).
  ui.nameForm.hidden = !guest;
  if (guest && !w.name && document.activeElement !== ui.name) ui.name.placeholder = "pick a name";
  markOwn();
}

function onDisconnect(d) {
  const why = d.reason ? `: ${d.reason}` : "";
  if (d.code === TOKEN_REVOKED) {
    // With a token in this tab, the same token is refused again: say so.
    const more = d.reason && d.reason !== "token revoked" ? `: ${d.reason}` : "";
    if (readToken()) ui.auth.open = true;
    return notice(readToken() ? `Your token was revoked${more}. Enter a new one under Token.` : `Your session was revoked${more}.${d.willReconnect ? " Reconnecting…" : ""}`);
  }
  if (d.code === DISCONNECTED_BY_SERVER && !d.willReconnect) {
    return notice(`The server disconnected you${why}. Press Reconnect under Token, or reload the page, to come back.`);
  }
  if (d.willReconnect) {
    // Browsers hide why an upgrade was refused (bad token, other origin,
    // node full): say what can help, once a try over server-sent events
    // failed too (before, a refused WebSocket may only be a proxy that
    // blocks WebSocket, and the client falls back by itself).
    if (!d.wasOpen && chat.welcome === null && chat.transport === "sse") {
      const hint = readToken()
        ? "Cannot connect: the server refused the connection (is the token valid?) or cannot be reached. Still trying."
        : readName()
        ? "Cannot connect: the server refused the connection (does it take this name?) or cannot be reached. Still trying."
        : "Cannot connect: the server refused the connection or cannot be reached. If this route needs a token, enter one under Token. Still trying.";
      ui.status.title = hint;
      notice(hint);
      if (!readToken()) ui.auth.open = true;
    }
    return;
  }
  notice(`Disconnected for good (${d.code}${d.reason ? `: ${d.reason}` : ""}). Press Reconnect under Token, or reload the page.`);
}

function onError(err) {
  // Subscribe failures of the current room are reported where they happen;
  // these are resubscribes given up, or frames the server sent unasked.
  if (err?.channel && err.channel !== channel) return;
  if (err?.code === "rate_limited") return notice("Slow down: the server is limiting how fast this page may send.");
  notice(`Error: ${describe(err)}`);
}

function onGap({ channel: ch, reason, reply, historyLost, missed }) {
  if (ch !== channel) return;
  if (reason === "history_lost" || reason === "not_recovered" || reason === "late") {
    notice(describeGap({ reason, reply, historyLost, missed }));
  } else if (!reply?.epoch) {
    // A resubscribe with history has no position to resume from only when
    // nothing came yet; then the replay shows everything. Without history,
    // what was said meanwhile is gone.
    notice("Reconnected. This room keeps no history, so messages sent while you were away are not shown.");
  }
}

// The server API subscribed this page to a channel: list it if it is a room
// (joining it then shows it; the current one changes nothing).
function onServerSubscribed({ channel: ch }) {
  const name = ch.startsWith("room:") ? ch.slice("room:".length) : "";
  if (ch === channel || !ROOM_NAME.test(name)) return;
  rememberRoom(name);
  notice(`The server added you to #${name}.`);
}

// The server API unsubscribed this page from a channel: the client dropped it.
function onServerUnsubscribed({ channel: ch }) {
  if (ch !== channel) return;
  removed = true;
  present.clear();
  renderOnline();
  notice(`The server removed you from #${ch.slice("room:".length)}: its new messages are not shown. Join it again to come back, if you may.`);
}

// Replaces the client, e.g. with a new token (maybe another user).
function reconnect() {
  const room = channel ? channel.slice("room:".length) : "lobby";
  const old = chat;
  chat = null; // first: the old client's last events (closed) are not shown
  old?.close();
  channel = null;
  user = "";
  guest = "";
  ui.whoami.textContent = "";
  delete ui.status.dataset.node;
  connect();
  join(room);
}

// ---- rooms ----

function roomFromHash() {
  try {
    const name = decodeURIComponent(location.hash.slice(1));
    return ROOM_NAME.test(name) ? name : null;
  } catch {
    return null;
  }
}

async function join(name) {
  const next = "room:" + name;
  if (next === channel && !removed) return;
  const previous = channel;
  const client = chat;
  const seq = ++joinSeq;
  channel = next;
  removed = false;

  history.replaceState(null, "", "#" + encodeURIComponent(name).replace(/%3A/g, ":").replace(/%40/g, "@").replace(/%2F/g, "/"));
  document.title = `#${name} · caddychat`;
  ui.roomTitle.textContent = "#" + name;
  ui.room.value = name;
  ui.messages.replaceChildren();
  typers.clear();
  renderTyping();
  present.clear();
  presenceOn = null;
  setPresenceNote("");
  renderOnline();
  rememberRoom(name);

  if (previous && previous !== next) client.unsubscribe(previous).catch(() => {});
  // A room the server subscribed this page to is adopted without a replay.
  const adopted = client.serverChannels.includes(next);
  try {
    await client.subscribe(next, (m) => seq === joinSeq && (m.ephemeral ? onEphemeral(m) : showMessage(m)), { history: HISTORY });
  } catch (err) {
    if (seq !== joinSeq || client !== chat) return;
    if (err.code === "unsubscribed" || err.code === "closed") return;
    notice(`Could not join ${name}: ${describe(err)}`);
    return;
  }
  if (seq !== joinSeq) return;
  refreshPresence();
  if (adopted) showEarlier(client, next, seq);
}

// The room's last messages, above those that came live meanwhile.
async function showEarlier(client, ch, seq) {
  let page;
  try {
    page = await client.history(ch, { limit: HISTORY });
  } catch {
    return; // a room without history, or gone: only what comes next is shown
  }
  if (seq !== joinSeq || client !== chat) return;
  for (const m of [...page.messages].reverse()) showMessage(m, true);
}

function rememberRoom(name) {
  const list = [name, ...recentRooms().filter((r) => r !== name)].slice(0, MAX_ROOMS);
  save("localStorage", ROOMS_KEY, JSON.stringify(list));
  renderRooms(list);
}

function renderRooms(list) {
  const current = channel?.slice("room:".length);
  ui.rooms.replaceChildren(
    ...list.map((name) => {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "room-link";
      button.textContent = "#" + name;
      button.dataset.room = name;
      if (name === current) button.setAttribute("aria-current", "true");
      li.append(button);
      return li;
    }),
  );
}

// ---- presence ----

async function refreshPresence() {
  const ch = channel;
  const client = chat;
  let users;
  try {
    users = await client.presence(ch);
  } catch (err) {
    if (ch !== channel || client !== chat) return;
    if (err.code === "bad_request") {
      presenceOn = false;
      setPresenceNote("Presence is off on this route: who is online is not shown.");
    } else if (err.code === "forbidden") {
      presenceOn = false;
      setPresenceNote("You may not see who is in this room.");
    }
    // Otherwise (disconnected, timeout, unavailable) the next resubscribe asks again.
    renderOnline();
    return;
  }
  if (ch !== channel || client !== chat) return;
  presenceOn = true;
  present.clear();
  for (const u of users) {
    const entry = presenceEntry(u);
    if (entry) present.set(entry.key, entry);
  }
  setPresenceNote(user || guest ? "" : "You are anonymous: only signed-in users and named guests are listed.");
  renderOnline();
}

// A user ({user}) or a guest ({anonymous, guest, name}) of a presence reply
// or event, keyed so that a guest can never take a user's place.
function presenceEntry(u) {
  if (!u || typeof u.user !== "string") return null;
  if (u.anonymous) {
    if (typeof u.guest !== "string" || !u.guest) return null;
    return { key: "g:" + u.guest, guest: u.guest, name: typeof u.name === "string" ? u.name : "" };
  }
  return { key: "u:" + u.user, user: u.user, name: infoName(u.info) || u.user };
}

// The display name in a user's info (user_info_claim or the connect hook),
// "" without one: the user id is shown then.
function infoName(info) {
  const name = info && typeof info === "object" ? info.name : undefined;
  return typeof name === "string" ? name.trim().slice(0, 64) : "";
}

function onPresenceEvent(ev) {
  if (ev.channel !== channel || presenceOn === false) return;
  const entry = presenceEntry(ev);
  if (!entry) return;
  if (ev.type === "join") present.set(entry.key, entry);
  else if (ev.type === "leave") present.delete(entry.key);
  renderOnline();
}

// Users first, then guests, each by name.
function comparePresent(a, b) {
  if (!a.guest !== !b.guest) return a.guest ? 1 : -1;
  return a.name < b.name ? -1 : a.name > b.name ? 1 : (a.guest ?? "") < (b.guest ?? "") ? -1 : 1;
}

function renderOnline() {
  const entries = [...present.values()].sort(comparePresent);
  ui.online.replaceChildren(
    ...entries.map((e) => {
      const li = document.createElement("li");
      if (e.guest) {
        li.dataset.guest = e.guest;
        li.append(e.name || "anonymous", guestBadge());
      } else {
        li.dataset.user = e.user;
        li.textContent = e.name;
        if (e.name !== e.user) li.title = e.user;
      }
      if ((e.user && e.user === user) || (e.guest && e.guest === guest)) {
        li.classList.add("me");
        li.title = "you";
      }
      return li;
    }),
  );
  ui.onlineCount.textContent = presenceOn ? String(entries.length) : "";
}

// The mark of a name a guest picked: the server never verified it.
function guestBadge() {
  const badge = document.createElement("span");
  badge.className = "guest-badge";
  badge.textContent = "guest";
  badge.title = "a name this person picked, not verified by the server";
  return badge;
}

function setPresenceNote(text) {
  ui.presenceNote.textContent = text;
  ui.presenceNote.hidden = !text;
}

// ---- messages ----

function messageText(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  if (typeof data === "string") return data;
  try {
    return JSON.stringify(data);
  } catch {
    return String(data);
  }
}

function formatTime(date) {
  const now = new Date();
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (date.toDateString() === now.toDateString()) return time;
  return `${date.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

function shownMessage(id) {
  return typeof id === "string" ? ui.messages.querySelector(`.message[data-id="${CSS.escape(id)}"]`) : null;
}

function showMessage(m, older = false) {
  if (m.channel !== channel) return;
  // Each message once, whatever else brought it already.
  if (shownMessage(m.id)) return;
  const stick = nearBottom();

  const el = document.createElement("article");
  el.className = "message";
  if (typeof m.id === "string") el.dataset.id = m.id;
  // Who sent it, as the server said, to tell later whether it is this tab's.
  el.sender = { id: m.id, from: m.from, anonymous: m.anonymous, server: m.server, guest: m.guest };
  if (own.isOwn(m)) el.classList.add("mine");

  const meta = document.createElement("div");
  meta.className = "meta";
  const from = document.createElement("span");
  from.className = "from";
  // The server says who sent it: a user, a guest with the name it picked
  // (marked: not verified), an anonymous client, or a backend.
  const guestName = !m.from && m.anonymous && typeof m.name === "string" && m.name ? m.name : "";
  from.textContent = (m.from && infoName(m.info)) || m.from || guestName || (m.server ? "server" : "anonymous");
  if (m.from) from.title = m.from;
  if (guestName) from.classList.add("guest");
  else if (!m.from) from.classList.add(m.server ? "server" : "anonymous");
  const time = document.createElement("time");
  time.className = "time";
  const date = new Date(m.ts);
  if (Number.isFinite(date.getTime())) {
    time.dateTime = date.toISOString();
    time.title = date.toLocaleString();
    time.textContent = formatTime(date);
  }
  meta.append(from);
  if (guestName) meta.append(guestBadge());
  meta.append(" ", time);

  const text = document.createElement("div");
  text.className = "text";
  text.textContent = messageText(m.data);

  el.append(meta, text);
  if (older) ui.messages.prepend(el);
  else append(el, stick);
  if (!older && typers.delete(senderKey(m))) renderTyping();
}

// ---- typing: ephemeral events, never kept, not echoed to the sender ----

// Who sent m, keyed as presence entries are.
function senderKey(m) {
  if (m.from) return "u:" + m.from;
  return m.anonymous && m.guest ? "g:" + m.guest : "";
}

function onEphemeral(m) {
  if (m.channel !== channel || !m.data || m.data.typing !== true) return;
  const key = senderKey(m);
  // Another tab of this user, or a sender the page cannot name.
  if (!key || (user && m.from === user) || (guest && m.guest === guest)) return;
  const name = (m.from && infoName(m.info)) || m.from || (typeof m.name === "string" && m.name) || "a guest";
  typers.set(key, { name, until: Date.now() + TYPING_SHOWN });
  renderTyping();
  setTimeout(renderTyping, TYPING_SHOWN + 50);
}

function renderTyping() {
  const now = Date.now();
  for (const [key, t] of typers) if (t.until <= now) typers.delete(key);
  const names = [...typers.values()].map((t) => t.name).sort();
  ui.typing.textContent =
    names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : names.length === 2 ? `${names[0]} and ${names[1]} are typing…` : `${names.length} people are typing…`;
}

// Tells the room this page is typing, at most once per TYPING_EVERY.
function sendTyping() {
  const now = Date.now();
  if (!channel || !ui.text.value.trim() || chat.state !== "connected" || now - typingSent < TYPING_EVERY) return;
  typingSent = now;
  chat.publish(channel, { typing: true }, { ephemeral: true }).catch(() => {});
}

function notice(text) {
  // A failure that repeats (a resubscribe retried while the broker is down) is said once.
  const last = ui.messages.lastElementChild;
  if (last?.classList.contains("notice") && last.textContent === text) return;
  const stick = nearBottom();
  const el = document.createElement("p");
  el.className = "notice";
  el.textContent = text;
  append(el, stick);
}

function append(el, stick) {
  ui.messages.append(el);
  while (ui.messages.childElementCount > MAX_SHOWN) ui.messages.firstElementChild.remove();
  if (stick) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function nearBottom() {
  const box = ui.messages;
  return box.scrollHeight - box.scrollTop - box.clientHeight < 48;
}

// A publish's ok: its message is this tab's, shown already or not.
function published(id) {
  own.published(id);
  shownMessage(id)?.classList.add("mine");
}

function markOwn() {
  for (const el of ui.messages.querySelectorAll(".message")) if (el.sender && own.isOwn(el.sender)) el.classList.add("mine");
}

function describe(err) {
  switch (err?.code) {
    case "disconnected":
      return "the connection dropped before the server confirmed it; it may or may not have been sent";
    case "queue_full":
      return "too many messages wait for the connection; try again once connected";
    case "closed":
      return "the connection is closed; press Reconnect under Token, or reload the page";
    case "timeout":
      return "the server did not answer in time";
    case "unavailable":
      return "the server cannot reach its message broker right now; try again";
    case "too_large":
      return "the message is too large";
    default:
      return err?.message || String(err);
  }
}

// ---- wiring ----

ui.joinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const name = ui.room.value.trim().replace(/^#/, "");
  if (!ROOM_NAME.test(name)) {
    ui.room.setCustomValidity("Room names are 1 to 123 letters, digits and _ - . : @ /");
    ui.room.reportValidity();
    return;
  }
  join(name);
});
ui.room.addEventListener("input", () => ui.room.setCustomValidity(""));

ui.rooms.addEventListener("click", (e) => {
  const name = e.target.closest("button[data-room]")?.dataset.room;
  if (name) join(name);
});

window.addEventListener("hashchange", () => {
  const name = roomFromHash();
  if (name) join(name);
});

ui.sendForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const text = ui.text.value;
  if (!text.trim() || !channel) return;
  ui.text.value = "";
  typingSent = 0;
  if (chat.state !== "connected") notice("Not connected: your message will be sent once the connection is back.");
  chat.publish(channel, { text }).then(published, (err) => notice(`Not sent: ${describe(err)}`));
});

ui.text.addEventListener("input", sendTyping);

ui.tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  save("sessionStorage", TOKEN_KEY, ui.token.value.trim() || null);
  reconnect();
});

ui.nameForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const name = ui.name.value.trim();
  if (name && !validGuestName(name)) {
    ui.name.setCustomValidity("1 to 24 letters or digits, with single spaces and _ - . ' between them");
    ui.name.reportValidity();
    return;
  }
  if (name === readName()) return;
  save("sessionStorage", NAME_KEY, name || null);
  reconnect();
});
ui.name.addEventListener("input", () => ui.name.setCustomValidity(""));

ui.tokenClear.addEventListener("click", () => {
  ui.token.value = "";
  save("sessionStorage", TOKEN_KEY, null);
  reconnect();
});

ui.token.value = readToken();
ui.name.value = readName();
renderRooms(recentRooms());
connect();
join(roomFromHash() ?? "lobby");
