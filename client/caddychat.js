// caddychat.js: browser client for caddychat's JSON protocol (../PROTOCOL.md).
// A dependency-free ES module: no build step; modern browsers and Node 20+.
//
// What it adds over a bare WebSocket: reconnects with capped, fully jittered
// exponential backoff; resubscribes the app's channels after a reconnect, resuming
// history channels from the last message the app saw (no gap, no duplicate);
// request/reply matching with timeouts; a bounded queue of publishes made
// while disconnected.
//
// Channels the server subscribes the connection to (the server API's
// subscribe: a `subscribed` frame) are the server's, not the app's: the
// server does not subscribe a new connection again, and neither does the
// client (it would undo the server's decision, and its own subscribe may not
// even be allowed: the server skipped the ACL and hooks). Their messages go
// to the `message` event, and to the listeners of an app that subscribe()s
// to such a channel: that adopts it, without a frame (the connection holds
// it already), and from then on the client keeps it like any other. An
// `unsubscribed` frame drops the channel, the app's own ones included: the
// server took it away, and a reconnect must not bring it back.
//
// Two transports, one API: a WebSocket, and where none gets through (a proxy
// that refuses upgrades), server-sent events (PROTOCOL.md, "SSE transport"):
// an EventSource on the same route with the channels in the query, and the
// ops POSTed with the stream's session; their replies come on the stream.
// The client starts with the first of `transports` and moves to the next one
// when `fallbackAfter` connects in a row ended before a welcome (or at once
// when the transport cannot even be constructed).

/** A fresh idempotency key: a random UUID (or 128 random bits in hex). */
export function newIdempotencyKey() {
  const c = globalThis.crypto;
  if (c?.randomUUID) return c.randomUUID();
  const bytes = new Uint8Array(16);
  if (c?.getRandomValues) c.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Close codes after which reconnecting cannot help: the client must change. */
export const PERMANENT_CLOSE_CODES = Object.freeze([1003, 1007, 1008, 1009]);

/** Close code the server uses when the token's exp passed without a refresh. */
export const TOKEN_EXPIRED = 4002;

/**
 * Close code of the server API's disconnect (its default code): the server
 * (a backend, an operator) wants this client gone, so it does not come back
 * by itself. The close reason is the API caller's.
 */
export const DISCONNECTED_BY_SERVER = 4005;

/**
 * Close code the server uses when the connection's token was revoked (server
 * API revoke). As after TOKEN_EXPIRED, only a token function can help: it may
 * fetch a token the revocation does not cover.
 */
export const TOKEN_REVOKED = 4006;

const DEFAULT_BACKOFF = Object.freeze({ initial: 1000, max: 30000, factor: 2 });

/** The transports, in the default order of trying them. */
export const TRANSPORTS = Object.freeze(["websocket", "sse"]);

// EventSource.readyState once it gave up (an HTTP error, a wrong content type).
const ES_CLOSED = 2;

// The error code of a refused POST without a JSON error body.
const HTTP_CODES = { 400: "bad_request", 401: "unauthorized", 403: "forbidden", 413: "too_large", 429: "rate_limited" };

/** An Error with a machine-readable `code` (the server's error code or one of the client's own). */
export class CaddyChatError extends Error {
  constructor(code, message, details) {
    super(message || code);
    this.name = "CaddyChatError";
    this.code = code;
    if (details) Object.assign(this, details);
  }
}

// History channels use Redis stream ids, <ms>-<seq>, which are ordered. Other
// ids (<ms>-<node>-<seq>) are unique but carry no order we may rely on.
const STREAM_ID = /^(\d+)-(\d+)$/;

/** Whether `id` is a stream id (`<ms>-<seq>`), the kind a resume can start from. */
export function isStreamId(id) {
  return typeof id === "string" && STREAM_ID.test(id);
}

/** Orders two stream ids: negative, 0 or positive. Exact for any length (no float rounding). */
export function compareStreamIds(a, b) {
  const [, am, as] = STREAM_ID.exec(a);
  const [, bm, bs] = STREAM_ID.exec(b);
  return compareDigits(am, bm) || compareDigits(as, bs);
}

function compareDigits(a, b) {
  a = a.replace(/^0+(?=\d)/, "");
  b = b.replace(/^0+(?=\d)/, "");
  if (a.length !== b.length) return a.length < b.length ? -1 : 1;
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Full-jitter backoff: a uniformly random delay in [0, min(max, initial·factor^attempt)).
 * Full jitter spreads the clients a node drops at once (1001 on shutdown) over
 * the whole window instead of bringing them back in waves.
 */
export function backoffDelay(attempt, { initial, max, factor } = DEFAULT_BACKOFF, random = Math.random) {
  return random() * Math.min(max, initial * Math.pow(factor, attempt));
}

// Room left in maxFrameSize for the correlation id the frame gets when sent.
const ID_ROOM = 24;
const encoder = new TextEncoder();

function byteLength(text, limit) {
  // Most frames are far below the limit: skip encoding when even 3 bytes per
  // UTF-16 unit would fit.
  return text.length * 3 <= limit ? text.length : encoder.encode(text).length;
}

function report(err) {
  (globalThis.reportError ?? console.error)(err);
}

/**
 * A sentence telling a user what a `gap` event means, in words that are true
 * for its cause; null for a gap that needs no notice.
 */
export function describeGap({ reason, reply, historyLost, missed }) {
  if (reason === "late") {
    const n = missed ?? 0;
    return `${n} ${n === 1 ? "message was" : "messages were"} not shown: the server was too busy to deliver ${n === 1 ? "it" : "them"} in time.`;
  }
  if (reason === "history_lost") {
    return "The server lost this room's earlier history (e.g. Redis restarted without persistence). Everything sent since is shown; a message sent at the moment it happened may be missing, and scrolling back stops there.";
  }
  if (reason !== "not_recovered") return null;
  if (historyLost) {
    const n = reply?.replayed ?? 0;
    const since = reply?.limited
      ? `Only the latest ${n} messages sent since are shown.`
      : n > 0 ? `All ${n} messages sent since are shown.` : "Nothing was sent since.";
    return `The server lost this room's earlier history while you were away (e.g. Redis restarted without persistence): messages sent before that may be missing. ${since}`;
  }
  if (reply?.limited) {
    return `You missed more messages than one reconnect replays: only the latest ${reply.replayed ?? 0} are shown.`;
  }
  return "Some messages sent while you were away could not be recovered: the room's history no longer holds them.";
}

/**
 * Which messages are this page's own, across reloads: those a publish of
 * this page resolved with (the ok's message_id), those the server says come
 * from this page's signed-in user, and those from a guest id the server
 * gave this page (routes with guest_names). Only what the server said
 * counts, never a message's data: no one else's message can pass for
 * one's own. `storage` (e.g. sessionStorage: this tab only) keeps the ids
 * across page loads; without it they last as long as the object.
 * Whatever the order of a message and its publish's ok, the message is
 * its sender's once either arrived.
 */
export class OwnMessages {
  #storage;
  #key;
  #max;
  #ids;
  #guests;
  #user = "";

  /** @param {{storage?: Storage | null, key?: string, max?: number}} [options] */
  constructor({ storage = null, key = "caddychat.own", max = 500 } = {}) {
    this.#storage = storage;
    this.#key = key;
    this.#max = max;
    const saved = this.#load();
    this.#ids = saved.ids;
    this.#guests = saved.guests;
  }

  /** Notes a welcome frame: its signed-in user, or its guest id. */
  welcome(w) {
    this.#user = (w && typeof w.user === "string" && w.user) || "";
    if (w && typeof w.guest === "string" && w.guest) this.#remember(this.#guests, w.guest);
  }

  /** Notes the message id a publish of this page resolved with. */
  published(id) {
    if (typeof id === "string" && id) this.#remember(this.#ids, id);
  }

  /** Whether msg (a delivery) is this page's own. */
  isOwn(msg) {
    if (!msg || typeof msg !== "object") return false;
    if (typeof msg.id === "string" && this.#ids.has(msg.id)) return true;
    if (msg.server) return false;
    if (msg.anonymous) return typeof msg.guest === "string" && this.#guests.has(msg.guest);
    return this.#user !== "" && msg.from === this.#user;
  }

  #remember(set, value) {
    set.delete(value);
    set.add(value); // most recent last
    while (set.size > this.#max) set.delete(set.values().next().value);
    this.#save();
  }

  #load() {
    try {
      const saved = JSON.parse(this.#storage?.getItem(this.#key) ?? "null");
      const strings = (list) => new Set(Array.isArray(list) ? list.filter((v) => typeof v === "string").slice(-this.#max) : []);
      return { ids: strings(saved?.ids), guests: strings(saved?.guests) };
    } catch {
      return { ids: new Set(), guests: new Set() };
    }
  }

  #save() {
    try {
      this.#storage?.setItem(this.#key, JSON.stringify({ ids: [...this.#ids], guests: [...this.#guests] }));
    } catch {
      // Storage full or unavailable: kept for this page load only.
    }
  }
}

export class CaddyChat {
  #url;
  #token;
  #WS;
  #backoff;
  #stableAfter;
  #maxQueued;
  #requestTimeout;
  #maxFrameSize;
  #maxRetries;
  #random;
  #setTimeout;
  #clearTimeout;
  #ES;
  #fetch;
  #transports;
  #transportIndex = 0;
  #fallbackAfter;
  #queryToken;
  #withCredentials;

  #state = "connecting";
  #ws = null;
  #es = null; // the current EventSource (transport "sse")
  #esChannels = new Set(); // the channels in its URL: the stream subscribes them at every open
  #session = null; // the SSE session of the current stream, from its welcome
  #postURL = null;
  #posts = Promise.resolve(); // POSTs go one after another, so ops keep their order
  #gen = 0; // counts connections: a late answer of an old one is ignored
  #welcomed = false; // the current connection got its welcome
  #failures = 0; // connects in a row on this transport that ended before a welcome
  #open = false; // the current socket is open
  #ready = false; // ...and its resubscriptions are answered, so requests may go out
  #closed = false; // permanently: close() or a permanent close code
  #everOpened = false;
  #attempt = 0; // reconnects since the last stable connection
  #reconnectTimer = null;
  #stableTimer = null;
  #nextId = 0;
  #pending = new Map(); // correlation id → request in flight
  #outbox = []; // requests waiting for a ready connection
  #requestSeq = 0; // orders requests, so resent publishes keep their order
  #channels = new Map(); // channel → subscription entry, in subscribe order
  // channel → {streamId, epoch} of its last delivery: what the server
  // subscribed this connection to (`subscribed`). Lost with the connection.
  #serverChannels = new Map();
  #listeners = new Map(); // event → Set of functions
  #welcome = null;

  /**
   * @param {string} url  ws:// or wss:// URL of the chat route.
   * @param {object} [options]  see caddychat.d.ts (CaddyChatOptions).
   */
  constructor(url, options = {}) {
    this.#url = url;
    this.#token = options.token;
    this.#WS = options.WebSocket ?? globalThis.WebSocket;
    this.#ES = options.EventSource ?? globalThis.EventSource;
    const fetchFn = options.fetch ?? globalThis.fetch;
    // Wrapped: a browser's fetch throws "Illegal invocation" with another `this`.
    this.#fetch = typeof fetchFn === "function" ? (url, init) => fetchFn(url, init) : null;
    const wanted = options.transports ?? TRANSPORTS;
    if (!Array.isArray(wanted) || wanted.length === 0 || wanted.some((t) => !TRANSPORTS.includes(t))) {
      throw new TypeError(`CaddyChat: transports must be a non-empty list of ${TRANSPORTS.map((t) => JSON.stringify(t)).join(", ")}`);
    }
    // Only those this environment has: a browser without EventSource, or
    // Node without a WebSocket, keeps the other.
    this.#transports = [...new Set(wanted)].filter((t) =>
      t === "websocket" ? typeof this.#WS === "function" : typeof this.#ES === "function" && this.#fetch !== null,
    );
    if (this.#transports.length === 0) {
      throw new TypeError(
        wanted.includes("websocket")
          ? "CaddyChat: no WebSocket implementation; pass options.WebSocket (or options.EventSource and options.fetch for SSE)"
          : "CaddyChat: no EventSource or fetch implementation; pass options.EventSource and options.fetch",
      );
    }
    this.#fallbackAfter = options.fallbackAfter ?? 2;
    this.#queryToken = options.queryToken === undefined ? "token" : options.queryToken;
    this.#withCredentials = options.withCredentials ?? false;
    this.#backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    this.#stableAfter = options.stableAfter ?? 10000;
    this.#maxQueued = options.maxQueued ?? 100;
    this.#requestTimeout = options.requestTimeout ?? 10000;
    this.#maxFrameSize = options.maxFrameSize ?? 64 * 1024;
    this.#maxRetries = options.maxRetries ?? Infinity;
    this.#random = options.random ?? Math.random;
    // Wrapped: browsers throw "Illegal invocation" when a bare
    // setTimeout is called with another `this`.
    this.#setTimeout = options.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    this.#clearTimeout = options.clearTimeout ?? ((handle) => globalThis.clearTimeout(handle));
    this.#connect();
  }

  /** `connecting` (never connected yet), `connected`, `reconnecting`, or `closed` (for good). */
  get state() {
    return this.#state;
  }

  /** The last welcome frame ({conn, node, user}), or null before the first. */
  get welcome() {
    return this.#welcome;
  }

  get url() {
    return this.#url;
  }

  /** The transport in use, or tried next: `websocket` or `sse`. */
  get transport() {
    return this.#transports[this.#transportIndex];
  }

  /** Names of the channels the client keeps subscribed. */
  get channels() {
    return [...this.#channels.keys()];
  }

  /**
   * Names of the channels the server subscribed this connection to that the
   * client does not keep (not resubscribed after a reconnect; subscribe() adopts one).
   */
  get serverChannels() {
    return [...this.#serverChannels.keys()].filter((ch) => !this.#channels.has(ch));
  }

  /**
   * Listen to `state`, `welcome`, `message`, `presence`, `subscribed`,
   * `unsubscribed`, `resubscribed`, `gap`, `disconnect` or `error`. Returns a
   * function that removes the listener.
   */
  on(event, fn) {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  /**
   * Subscribes to `channel`; `onMessage` gets each delivery. Resolves with
   * {channel, reply, unsubscribe} once the server confirmed the first subscribe.
   * Subscribing again to a channel adds a listener (options of later calls are ignored).
   * A channel the server subscribed this connection to is adopted at once, without a
   * frame and so without a replay, and kept from then on.
   */
  subscribe(channel, onMessage, options = {}) {
    if (this.#closed) return Promise.reject(closedError());
    let entry = this.#channels.get(channel);
    if (!entry) {
      const held = this.#serverChannels.get(channel);
      // Where the app is: the last delivery of a channel the server
      // subscribed, else a position it stored (e.g. across page loads).
      const at = held?.streamId ? held : { streamId: options.since ?? null, epoch: options.epoch ?? null };
      entry = {
        channel,
        listeners: new Set(),
        history: options.history ?? 0,
        streamId: at.streamId,
        epoch: at.epoch,
        reply: null,
        confirmed: false,
        waiters: [],
        retryTimer: null,
        retries: 0,
        inFlight: 0, // subscribe frames without a reply yet
      };
      this.#channels.set(channel, entry);
      if (held) {
        // The connection holds it already: a subscribe frame would be
        // refused with history or since ("already subscribed"), and may not
        // pass the ACL the server skipped. The next connection resubscribes.
        this.#serverChannels.delete(channel);
        entry.confirmed = true;
        entry.reply = { type: "ok", channel };
      } else if (this.#open) {
        this.#sendSubscribe(entry);
      }
      // Not open: the subscribe goes out with the next connection's resubscriptions.
    }
    const registration = { fn: onMessage };
    entry.listeners.add(registration);
    const subscription = (reply) => ({
      channel,
      reply,
      unsubscribe: () => this.#removeListener(entry, registration),
    });
    if (entry.confirmed) return Promise.resolve(subscription(entry.reply));
    return new Promise((resolve, reject) => {
      entry.waiters.push({
        resolve: (reply) => resolve(subscription(reply)),
        reject: (err) => {
          entry.listeners.delete(registration);
          reject(err);
        },
      });
    });
  }

  /**
   * Leaves `channel` (every listener of it), also one the server subscribed.
   * Resolves when the server confirmed, at once when disconnected.
   */
  unsubscribe(channel) {
    const entry = this.#channels.get(channel);
    const held = this.#serverChannels.delete(channel);
    if (!entry && !held) return Promise.resolve();
    if (entry) {
      this.#channels.delete(channel);
      this.#clearTimer(entry.retryTimer);
      this.#settleWaiters(entry, null, new CaddyChatError("unsubscribed", `unsubscribed from ${channel} before the server confirmed`));
    }
    // A closed socket holds no subscription; the next one will not be told about this channel.
    if (!this.#open) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const left = () => {
        // A `subscribed` that came before this reply was undone by it.
        this.#serverChannels.delete(channel);
        resolve();
      };
      this.#transmit({ frame: { op: "unsubscribe", channel }, resolve: left, reject, onDrop: () => resolve() });
    });
  }

  /** The position to resume `channel` from: {since, epoch}, or null when it has none (see README). */
  position(channel) {
    const at = this.#channels.get(channel) ?? this.#serverChannels.get(channel);
    return at && isStreamId(at.streamId) ? { since: at.streamId, epoch: at.epoch } : null;
  }

  /**
   * Publishes `data` (any JSON value). Resolves with the message id.
   * With `options.ephemeral`, for the current subscribers only (not this
   * connection): never kept, no id (resolves with undefined), no key.
   *
   * Every publish carries an idempotency key (a fresh random one, or
   * `options.idempotencyKey`): when the connection drops before the reply,
   * an authenticated client sends the same publish again, with the same key,
   * once it has reconnected, and the server answers a repeat with the first
   * message id without delivering it twice. An anonymous client's keys end
   * with its connection, so it rejects with `disconnected` instead, as
   * before.
   */
  publish(channel, data, options = {}) {
    if (data === undefined) return Promise.reject(new CaddyChatError("bad_request", "publish needs data (any JSON value but undefined)"));
    if (options.ephemeral) {
      // For the current subscribers only (typing...): never kept, so no id
      // and no key, and not resent after a reconnect, when it would be late.
      return this.#request({ op: "publish", channel, data, ephemeral: true }).then(() => undefined);
    }
    const key = options.idempotencyKey ?? newIdempotencyKey();
    return this.#request({ op: "publish", channel, data, idempotency_key: key }, { resend: true }).then((reply) => reply.message_id);
  }

  /** A page of kept messages older than `before` (the newest without it), oldest first. */
  history(channel, { limit, before } = {}) {
    const frame = { op: "history", channel };
    if (limit !== undefined) frame.limit = limit;
    if (before !== undefined) frame.before = before;
    return this.#request(frame).then((reply) => ({
      messages: reply.messages ?? [],
      more: Boolean(reply.more),
      epoch: reply.epoch ?? null,
    }));
  }

  /** Who is on `channel` now: [{user, connections}], on every node. */
  presence(channel) {
    return this.#request({ op: "presence", channel }).then((reply) => reply.users ?? []);
  }

  /**
   * Moves the open connection to a fresh token (the `refresh` op), so it is
   * not closed with 4002 when the old one expires. Without an argument the
   * token option is asked for one. When disconnected, resolves with null: the
   * next connection uses the new token anyway.
   */
  async refresh(token) {
    if (this.#closed) throw closedError();
    if (token !== undefined && typeof this.#token !== "function") this.#token = token;
    const fresh = token ?? (await this.#resolveToken());
    if (!this.#open) return null;
    return new Promise((resolve, reject) => this.#transmit({ frame: { op: "refresh", token: fresh }, resolve, reject }));
  }

  /** Closes with 1000 for good: no reconnect; pending and queued requests reject with code `closed`. */
  close() {
    if (this.#closed) return;
    const ws = this.#ws;
    this.#detach(); // closes an EventSource too
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        // Already closing: nothing left to do.
      }
    }
    this.#shutdown(closedError());
  }

  // ---- connection lifecycle ----

  async #connect() {
    let token;
    try {
      token = await this.#resolveToken();
    } catch (err) {
      if (this.#closed) return;
      this.#emit("error", new CaddyChatError("token", `the token function failed: ${err?.message ?? err}`, { cause: err }));
      this.#retry(this.#nextDelay());
      return;
    }
    if (this.#closed) return;
    if (this.transport === "sse") return this.#connectStream(token);
    // The server answers with "caddychat" alone, never echoing the token; a
    // bearer.<token> without "caddychat" is refused with 400.
    const protocols = token ? ["caddychat", "bearer." + token] : ["caddychat"];
    let ws;
    try {
      ws = new this.#WS(this.#url, protocols);
    } catch (err) {
      // A bad URL, or a token with characters a subprotocol cannot carry:
      // retrying the same thing cannot work.
      this.#cannotConnect("WebSocket", err);
      return;
    }
    this.#ws = ws;
    ws.onopen = () => ws === this.#ws && this.#onOpen();
    ws.onmessage = (ev) => ws === this.#ws && this.#onFrame(ev.data);
    ws.onclose = (ev) => ws === this.#ws && this.#onClose(ev.code, ev.reason ?? "");
    // Browsers report no detail in error events, and a close event follows.
    ws.onerror = () => {};
  }

  // The transport cannot even be constructed (a bad URL, a token it cannot
  // carry): never tried again; the next one, if any, at once.
  #cannotConnect(what, err) {
    this.#emit("error", new CaddyChatError("connect", `cannot open a ${what}: ${err?.message ?? err}`, { cause: err }));
    if (this.#closed) return;
    if (this.#transports.length === 1) {
      this.#shutdown(closedError());
      return;
    }
    const previous = this.transport;
    this.#transports.splice(this.#transportIndex, 1);
    this.#transportIndex %= this.#transports.length;
    this.#failures = 0;
    this.#emit("transport", { transport: this.transport, previous });
    this.#retry(0);
  }

  // The route's http(s) URL: the stream's base and where ops are POSTed.
  #httpURL() {
    const u = new URL(this.#url, globalThis.location?.href);
    if (u.protocol === "ws:") u.protocol = "http:";
    else if (u.protocol === "wss:") u.protocol = "https:";
    return u;
  }

  // Opens the event stream. Its URL names the channels to subscribe at open:
  // those without a position to resume from (and, since ?history applies to
  // all of them, with the same history as the first). The others are
  // subscribed with a POST once the welcome came, with since + epoch: a new
  // EventSource cannot send Last-Event-ID, only the one that reconnects by
  // itself does.
  #connectStream(token) {
    let url;
    let es;
    const fresh = [...this.#channels.values()].filter((e) => !isStreamId(e.streamId));
    const history = fresh[0]?.history ?? 0;
    const inQuery = fresh.filter((e) => e.history === history).map((e) => e.channel);
    try {
      const base = this.#httpURL();
      url = new URL(base);
      for (const ch of inQuery) url.searchParams.append("channel", ch);
      if (history > 0 && inQuery.length > 0) url.searchParams.set("history", String(history));
      if (token && this.#queryToken) url.searchParams.set(this.#queryToken, token);
      this.#postURL = base.href;
      es = new this.#ES(url.href, this.#withCredentials ? { withCredentials: true } : undefined);
    } catch (err) {
      this.#cannotConnect("EventSource", err);
      return;
    }
    this.#es = es;
    this.#esChannels = new Set(inQuery);
    es.onmessage = (ev) => es === this.#es && this.#onFrame(ev.data);
    es.onerror = () => es === this.#es && this.#onStreamError(es);
  }

  // The stream failed. An EventSource that had a session reconnects by
  // itself, with Last-Event-ID (the server resumes the channels of its URL
  // from there): it is given that one try. One that gave up (an HTTP
  // error), or a connect that failed before its welcome, is closed, and the
  // client reconnects as after a WebSocket close.
  #onStreamError(es) {
    if (this.#open && es.readyState !== ES_CLOSED) {
      this.#onClose(1006, "the event stream dropped", true);
      return;
    }
    this.#onClose(1006, es.readyState === ES_CLOSED ? "the event stream was refused" : "the event stream failed");
  }

  async #resolveToken() {
    const t = this.#token;
    return typeof t === "function" ? await t() : t;
  }

  #onOpen() {
    this.#open = true;
    this.#everOpened = true;
    this.#stableTimer = this.#setTimeout(() => {
      this.#stableTimer = null;
      this.#attempt = 0;
    }, this.#stableAfter);
    this.#resubscribeAll();
    // Last: a listener may call close().
    this.#setState("connected");
  }

  // keepStream: the EventSource reconnects by itself (see #onStreamError).
  #onClose(code, reason, keepStream = false) {
    const wasOpen = this.#open;
    const welcomed = this.#welcomed;
    this.#detach(keepStream);
    // Nobody knows whether these reached the broker. A publish carries an
    // idempotency key, which the server keeps per user: an authenticated
    // client sends it again, first thing on the next connection, and the
    // server delivers it at most once. Anything else rejects rather than
    // resend, so nothing is done twice behind the app's back. Subscribes
    // are the exception; the next connection resends them.
    const inFlight = [...this.#pending.values()];
    this.#pending.clear();
    const keysSurvive = Boolean(this.#welcome?.user);
    const resend = [];
    for (const req of inFlight) {
      this.#clearTimer(req.timer);
      if (req.onDrop) req.onDrop();
      else if (req.resend && keysSurvive) resend.push(req);
      else req.reject(new CaddyChatError("disconnected", `the connection closed (${code}) before the reply; the ${req.frame.op} may or may not have taken effect`));
    }
    // A fixed token that expired or was revoked would only be refused (401)
    // on every retry. A server API disconnect is the server's decision: not
    // undone behind its back (the app may reconnect with a new client).
    const tokenRefused = code === TOKEN_EXPIRED || code === TOKEN_REVOKED;
    const permanent =
      PERMANENT_CLOSE_CODES.includes(code) ||
      code === DISCONNECTED_BY_SERVER ||
      (tokenRefused && typeof this.#token !== "function");
    // In the order they were sent, ahead of what was queued meanwhile.
    resend.sort((x, y) => x.seq - y.seq);
    this.#outbox.unshift(...resend);
    let delay = permanent ? null : this.#nextDelay();
    // A transport that keeps failing before its welcome is given up for the
    // next one (e.g. a proxy that refuses WebSocket upgrades), at once.
    let previous = null;
    if (!permanent && !welcomed && ++this.#failures >= this.#fallbackAfter && this.#transports.length > 1) {
      previous = this.transport;
      this.#transportIndex = (this.#transportIndex + 1) % this.#transports.length;
      this.#failures = 0;
      if (delay !== null) delay = 0;
    }
    if (previous !== null || delay === null) keepStream = false;
    if (!keepStream) this.#closeStream();
    this.#emit("disconnect", { code, reason, wasOpen, willReconnect: delay !== null, delay: keepStream ? 0 : delay });
    if (previous !== null) this.#emit("transport", { transport: this.transport, previous });
    if (permanent) {
      this.#shutdown(new CaddyChatError("closed", `the server closed the connection with ${code}${reason ? ` (${reason})` : ""}`, { closeCode: code }));
      return;
    }
    if (keepStream) {
      // The EventSource is on it; its next welcome is the new connection.
      if (!this.#closed) this.#setState("reconnecting");
      return;
    }
    this.#retry(delay);
  }

  // The next reconnect's delay, or null once maxRetries attempts in a row failed.
  #nextDelay() {
    if (this.#attempt >= this.#maxRetries) return null;
    return backoffDelay(this.#attempt++, this.#backoff, this.#random);
  }

  #retry(delay) {
    if (this.#closed) return; // a listener may have called close()
    if (delay === null) {
      this.#shutdown(new CaddyChatError("closed", `gave up after ${this.#attempt} reconnect attempts`));
      return;
    }
    this.#reconnectTimer = this.#setTimeout(() => {
      this.#reconnectTimer = null;
      this.#connect();
    }, delay);
    // After arming the timer, so that a listener calling close() clears it.
    this.#setState(this.#everOpened ? "reconnecting" : "connecting");
  }

  // Forgets the current socket: its late events are ignored from now on.
  // keepStream: an EventSource that reconnects by itself stays (see #onStreamError).
  #detach(keepStream = false) {
    const ws = this.#ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this.#ws = null;
    if (!keepStream) this.#closeStream();
    this.#session = null;
    this.#gen++;
    this.#open = false;
    this.#ready = false;
    this.#welcomed = false;
    this.#clearTimer(this.#stableTimer);
    this.#stableTimer = null;
    for (const entry of this.#channels.values()) {
      this.#clearTimer(entry.retryTimer);
      entry.retryTimer = null;
    }
    // The server does not subscribe the next connection again, nor does the client.
    this.#serverChannels.clear();
  }

  #closeStream() {
    const es = this.#es;
    if (!es) return;
    es.onmessage = es.onerror = es.onopen = null;
    this.#es = null;
    try {
      es.close();
    } catch {
      // Closed already.
    }
  }

  #shutdown(err) {
    this.#closed = true;
    this.#closeStream();
    this.#clearTimer(this.#reconnectTimer);
    this.#reconnectTimer = null;
    const inFlight = [...this.#pending.values()];
    this.#pending.clear();
    for (const req of inFlight) {
      this.#clearTimer(req.timer);
      // Subscribes settle through their channel's waiters below.
      if (req.onDrop) req.onDrop();
      else req.reject(err);
    }
    const queued = this.#outbox;
    this.#outbox = [];
    for (const req of queued) req.reject(err);
    for (const entry of this.#channels.values()) this.#settleWaiters(entry, null, err);
    this.#channels.clear();
    this.#serverChannels.clear();
    this.#setState("closed");
  }

  // ---- subscriptions ----

  #resubscribeAll() {
    const gen = this.#gen;
    const entries = [...this.#channels.values()];
    const stream = this.#es !== null;
    if (stream) {
      // Channels in the stream's URL the app left meanwhile: the stream
      // subscribed them again.
      for (const ch of this.#esChannels) {
        if (!this.#channels.has(ch)) this.#transmit({ frame: { op: "unsubscribe", channel: ch }, resolve() {}, reject() {}, onDrop() {} });
      }
    }
    let waiting = entries.length;
    if (waiting === 0) return this.#setReady();
    // Queued publishes wait for every answer, so that a publisher subscribed
    // to its own channel gets its own message.
    const answered = () => {
      if (--waiting === 0 && gen === this.#gen) this.#setReady();
    };
    // Over SSE, the stream itself subscribes the channels of its URL and
    // answers each with an ok (or error) without an id.
    for (const entry of entries) this.#sendSubscribe(entry, answered, stream && this.#esChannels.has(entry.channel));
  }

  #setReady() {
    this.#ready = true;
    const queued = this.#outbox;
    this.#outbox = [];
    for (const req of queued) this.#transmit(req);
  }

  #sendSubscribe(entry, answered = () => {}, byStream = false) {
    const frame = { op: "subscribe", channel: entry.channel };
    // Only a stream id is a position the server can resume from; anything
    // else is answered bad_request. (The stream resumes from its Last-Event-ID.)
    const resumed = isStreamId(entry.streamId);
    if (byStream) {
      // Nothing to send: the stream's open subscribed it.
    } else if (resumed) {
      frame.since = entry.streamId;
      if (entry.epoch) frame.epoch = entry.epoch;
    } else if (entry.history > 0) {
      // Nothing seen yet, so every kept message is new to the app.
      frame.history = entry.history;
    }
    const wasConfirmed = entry.confirmed;
    entry.inFlight++;
    (byStream ? this.#awaitStream : this.#transmit).call(this, {
      frame,
      resolve: (reply) => {
        entry.inFlight--;
        if (this.#channels.get(entry.channel) === entry) this.#subscribed(entry, reply, resumed, wasConfirmed);
        answered();
      },
      reject: (err) => {
        entry.inFlight--;
        if (this.#channels.get(entry.channel) === entry) this.#subscribeFailed(entry, err);
        answered();
      },
      // The next connection resubscribes; the app's promise stays pending.
      onDrop: () => {
        entry.inFlight--;
      },
    });
  }

  #subscribed(entry, reply, resumed, wasConfirmed) {
    // A new epoch means the history the position pointed into was lost: the
    // old ids say nothing about the new ones.
    const historyLost = Boolean(reply.epoch && entry.epoch && reply.epoch !== entry.epoch);
    if (historyLost) entry.streamId = null;
    if (reply.epoch) entry.epoch = reply.epoch;
    entry.reply = reply;
    entry.retries = 0;
    entry.confirmed = true;
    if (!wasConfirmed) {
      this.#settleWaiters(entry, reply);
      return;
    }
    this.#emit("resubscribed", { channel: entry.channel, reply, resumed });
    if (reply.recovered === false) {
      // historyLost: the server lost the history the position pointed into
      // (e.g. Redis restarted without persistence); the replay holds all of
      // the new history, and only what came just before the loss may be gone.
      this.#emit("gap", { channel: entry.channel, reply, reason: "not_recovered", historyLost: resumed && historyLost });
    } else if (!resumed) {
      // A plain subscribe cannot say what happened while we were away.
      this.#emit("gap", { channel: entry.channel, reply, reason: "no_resume_point" });
    }
  }

  #subscribeFailed(entry, err) {
    err.channel = entry.channel;
    if (!entry.confirmed) {
      // The app's first subscribe: its promise reports the failure.
      this.#channels.delete(entry.channel);
      this.#settleWaiters(entry, null, err);
      // A late ok would leave the server subscribed to a channel we forgot.
      if (err.code === "timeout" && this.#open) {
        this.#serverChannels.delete(entry.channel);
        this.#transmit({ frame: { op: "unsubscribe", channel: entry.channel }, resolve() {}, reject() {}, onDrop() {} });
      }
      return;
    }
    // A resubscribe: the library owns it, so it keeps trying while the
    // failure can pass, and gives the channel up (telling the app) when not.
    if (["unavailable", "timeout", "rate_limited", "internal"].includes(err.code) && this.#open) {
      const delay = backoffDelay(entry.retries++, this.#backoff, this.#random);
      entry.retryTimer = this.#setTimeout(() => {
        entry.retryTimer = null;
        if (this.#open && this.#channels.get(entry.channel) === entry) this.#sendSubscribe(entry);
      }, delay);
      this.#emit("error", err);
      return;
    }
    this.#channels.delete(entry.channel);
    this.#emit("error", err);
  }

  #settleWaiters(entry, reply, err) {
    const waiters = entry.waiters;
    entry.waiters = [];
    for (const w of waiters) (err ? w.reject(err) : w.resolve(reply));
  }

  #removeListener(entry, registration) {
    entry.listeners.delete(registration);
    if (entry.listeners.size === 0 && this.#channels.get(entry.channel) === entry) return this.unsubscribe(entry.channel);
    return Promise.resolve();
  }

  // ---- frames ----

  #request(frame, { resend = false } = {}) {
    if (this.#closed) return Promise.reject(closedError());
    let text;
    try {
      text = JSON.stringify(frame);
    } catch (err) {
      return Promise.reject(new CaddyChatError("bad_request", `not JSON-serializable: ${err.message}`));
    }
    // The server closes the whole connection (1009) on a frame over its
    // max_message_size; refusing it here costs only this request.
    const limit = this.#maxFrameSize - ID_ROOM;
    if (byteLength(text, limit) > limit) {
      return Promise.reject(new CaddyChatError("too_large", `the ${frame.op} frame is over maxFrameSize (${this.#maxFrameSize} bytes)`));
    }
    return new Promise((resolve, reject) => {
      const req = { frame, resolve, reject, resend, seq: ++this.#requestSeq };
      if (this.#ready) this.#transmit(req);
      else if (this.#outbox.length >= this.#maxQueued) reject(new CaddyChatError("queue_full", `${this.#maxQueued} requests already wait for a connection`));
      else this.#outbox.push(req);
    });
  }

  // Sends req on the open socket (or POSTs it to the stream's session) and
  // waits for the reply with its id.
  #transmit(req) {
    const id = ++this.#nextId;
    this.#await(id, req);
    const text = JSON.stringify({ ...req.frame, id });
    if (this.#es) {
      this.#post(id, req, text);
      return;
    }
    try {
      this.#ws.send(text);
    } catch {
      // The socket is going away; its close event settles req.
    }
  }

  #await(key, req) {
    req.timer = this.#setTimeout(() => {
      if (this.#pending.get(key) !== req) return;
      this.#pending.delete(key);
      req.reject(new CaddyChatError("timeout", `no reply to ${req.frame.op} within ${this.#requestTimeout} ms`));
    }, this.#requestTimeout);
    this.#pending.set(key, req);
  }

  // The stream's answer to the subscribe of a channel in its URL: an ok or
  // error without an id, after the welcome.
  #awaitStream(req) {
    this.#await(streamKey(req.frame.channel), req);
  }

  // POSTs an op to the stream's session, after the POSTs before it (so that
  // publishes keep their order). Its reply comes on the stream; a refusal
  // comes as the POST's answer.
  #post(id, req, text) {
    const gen = this.#gen;
    const session = this.#session;
    const url = this.#postURL;
    const settle = (err) => {
      if (this.#pending.get(id) !== req) return;
      this.#pending.delete(id);
      this.#clearTimer(req.timer);
      req.reject(err);
    };
    const send = async () => {
      if (gen !== this.#gen || this.#pending.get(id) !== req) return;
      let res;
      try {
        res = await this.#fetch(url, {
          method: "POST",
          headers: { "Content-Type": "application/json", "Caddychat-Session": session },
          body: text,
          credentials: this.#withCredentials ? "include" : "same-origin",
        });
      } catch (err) {
        settle(new CaddyChatError("unavailable", `the POST of the ${req.frame.op} failed (${err?.message ?? err}); it may or may not have taken effect`));
        return;
      }
      if (res.ok) return; // 202: the reply comes on the stream
      if (res.status === 404 && gen === this.#gen) {
        // The session is gone (the stream ended): the requests in flight
        // are settled as after a drop, and the client reconnects.
        this.#onClose(1006, "the SSE session is gone");
        return;
      }
      let body = null;
      try {
        body = await res.json();
      } catch {
        // Not JSON: the status says it.
      }
      const code = body?.error?.code ?? HTTP_CODES[res.status] ?? (res.status >= 500 ? "unavailable" : "bad_request");
      settle(new CaddyChatError(code, body?.error?.message ?? `the POST of the ${req.frame.op} was answered ${res.status}`));
    };
    const next = this.#posts.then(send);
    this.#posts = next.catch(() => {});
  }

  #onFrame(data) {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this.#emit("error", new CaddyChatError("bad_frame", "the server sent a frame that is not JSON"));
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "message":
        return this.#onDelivery(frame);
      case "join":
      case "leave":
        return this.#emit("presence", frame);
      case "welcome":
        this.#welcome = frame;
        this.#welcomed = true;
        this.#failures = 0;
        if (this.#es) {
          // Over SSE the welcome opens the connection: ops need its session.
          this.#session = typeof frame.session === "string" ? frame.session : "";
          this.#onOpen();
          if (this.#closed) return;
        }
        return this.#emit("welcome", frame);
      case "close":
        // Over SSE, the server's close: as a WebSocket's close with that code.
        if (this.#es) this.#onClose(typeof frame.code === "number" ? frame.code : 1006, typeof frame.reason === "string" ? frame.reason : "");
        return;
      case "subscribed":
        if (typeof frame.channel === "string") this.#onServerSubscribed(frame.channel);
        return;
      case "unsubscribed":
        if (typeof frame.channel === "string") this.#onServerUnsubscribed(frame.channel);
        return;
      case "gap":
        // Messages the server did not send because they were later than its
        // max_lag (overloaded): counted, never delivered late.
        if (typeof frame.channel === "string" && Number.isInteger(frame.missed) && frame.missed > 0) {
          this.#emit("gap", { channel: frame.channel, reply: null, reason: "late", missed: frame.missed });
        }
        return;
    }
    // Everything else answers a request (ok, error, presence, history);
    // unknown types from newer servers are ignored. Over SSE, an ok or error
    // without an id answers the stream's subscribe of a channel of its URL.
    const key = frame.id !== undefined ? frame.id : this.#es && typeof frame.channel === "string" && this.#esChannels.has(frame.channel) ? streamKey(frame.channel) : undefined;
    const req = key !== undefined ? this.#pending.get(key) : undefined;
    if (!req) {
      if (frame.type === "error" && typeof key !== "string") this.#emit("error", serverError(frame));
      return;
    }
    this.#pending.delete(key);
    this.#clearTimer(req.timer);
    if (frame.type === "error") req.reject(serverError(frame));
    else req.resolve(frame);
  }

  // The server API subscribed this connection to `channel`; its messages
  // follow. Remembered for this connection only (see the top of the file).
  #onServerSubscribed(channel) {
    if (!this.#serverChannels.has(channel)) this.#serverChannels.set(channel, { streamId: null, epoch: null });
    this.#emit("subscribed", { channel });
  }

  // The server API unsubscribed this connection from `channel`.
  #onServerUnsubscribed(channel) {
    const held = this.#serverChannels.delete(channel);
    const entry = this.#channels.get(channel);
    if (entry && entry.inFlight > 0) {
      // The app's subscribe went out before this frame came and is answered
      // after it: the server subscribes the connection again (or refuses,
      // and the reply says so). The client keeps the channel.
      return;
    }
    if (entry) {
      // The server took it away: not resubscribed after a reconnect either.
      this.#channels.delete(channel);
      this.#clearTimer(entry.retryTimer);
      entry.retryTimer = null;
      this.#settleWaiters(entry, null, new CaddyChatError("unsubscribed", `the server unsubscribed this connection from ${channel}`));
    } else if (!held) {
      return; // neither the app's nor the server's (e.g. its unsubscribe is in flight)
    }
    this.#emit("unsubscribed", { channel });
  }

  #onDelivery(msg) {
    const entry = this.#channels.get(msg.channel);
    if (!entry) {
      // A channel only the server subscribed: the app's message event, and
      // where it is, should the app adopt it (subscribe) or store it.
      const held = this.#serverChannels.get(msg.channel);
      if (!held) return; // unsubscribed, or its unsubscribe is in flight
      if (isStreamId(msg.id)) {
        held.streamId = msg.id;
        if (msg.epoch) held.epoch = msg.epoch;
      }
      this.#emit("message", msg);
      return;
    }
    if (isStreamId(msg.id)) {
      // The server already drops replayed duplicates; this guards the app
      // against any that slip through (e.g. a resume racing a late live copy).
      const sameHistory = !msg.epoch || !entry.epoch || msg.epoch === entry.epoch;
      if (sameHistory && isStreamId(entry.streamId) && compareStreamIds(msg.id, entry.streamId) <= 0) return;
      // A live message of a new epoch: the server lost the channel's history
      // while this connection stayed up (it then delivers the new history
      // whole); messages sent just before the loss may be missing.
      const lost = !sameHistory && isStreamId(entry.streamId);
      entry.streamId = msg.id;
      if (msg.epoch) entry.epoch = msg.epoch;
      if (lost) this.#emit("gap", { channel: entry.channel, reply: null, reason: "history_lost", historyLost: true });
    }
    for (const { fn } of [...entry.listeners]) if (fn) this.#call(fn, msg, "message");
    this.#emit("message", msg);
  }

  // ---- helpers ----

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit("state", state);
  }

  #emit(event, arg) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) this.#call(fn, arg, event);
  }

  // One throwing listener must not stop the others or the client itself.
  #call(fn, arg, event) {
    try {
      fn(arg);
    } catch (err) {
      if (event === "error") report(err);
      else this.#emit("error", err);
    }
  }

  #clearTimer(handle) {
    if (handle != null) this.#clearTimeout(handle);
  }
}

// The #pending key of the stream's own subscribe of a channel (numbers are ids).
function streamKey(channel) {
  return "stream:" + channel;
}

function closedError() {
  return new CaddyChatError("closed", "the client is closed");
}

function serverError(frame) {
  return new CaddyChatError(frame.code || "internal", frame.message || frame.code || "error reply without a code");
}
