// A typed use of the whole public API of caddychat.js, as client/README.md and
// PROTOCOL.md document it. `tsc -p client/typecheck` (make typecheck) checks
// it against client/caddychat.d.ts: every call here must type-check, and every
// line under @ts-expect-error must not (so a declaration that went loose, e.g.
// to `any`, fails too). Nothing here runs.
//
// api.test.mjs checks the other direction: that the declarations name what
// caddychat.js exports, its methods, options, events and error codes.

import {
  CaddyChat,
  CaddyChatError,
  DISCONNECTED_BY_SERVER,
  PERMANENT_CLOSE_CODES,
  TOKEN_EXPIRED,
  TOKEN_REVOKED,
  TRANSPORTS,
  backoffDelay,
  compareStreamIds,
  describeGap,
  isStreamId,
} from "../caddychat.js";
import type {
  BackoffOptions,
  CaddyChatEvents,
  CaddyChatOptions,
  ConnectionState,
  DisconnectEvent,
  ErrorCode,
  EventSourceConstructor,
  EventSourceLike,
  FetchLike,
  GapEvent,
  HistoryPage,
  JSONValue,
  Message,
  PresenceEvent,
  PresenceUser,
  ResubscribedEvent,
  SubscribeOptions,
  SubscribeReply,
  SubscribedEvent,
  Subscription,
  TokenSource,
  Transport,
  TransportEvent,
  UnsubscribedEvent,
  Welcome,
  WebSocketConstructor,
  WebSocketLike,
} from "../caddychat.js";

// Exact type equality, for the results the README promises.
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
function expectType<T extends true>(): void {}

declare function show(from: string, text: string): void;

// ---- connect options ----

// A test's fake socket, like client/caddychat.test.mjs's.
class FakeSocket implements WebSocketLike {
  onopen: ((ev: unknown) => void) | null = null;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason?: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  constructor(
    readonly url: string,
    readonly protocols?: string | string[],
  ) {}
  send(_data: string): void {}
  close(_code?: number, _reason?: string): void {}
}

const tokens: TokenSource[] = [
  "eyJ...",
  null,
  undefined,
  () => "eyJ...",
  () => null,
  () => fetch("/api/chat-token").then((r) => r.text()),
  async () => undefined,
];

const backoff: BackoffOptions = { initial: 1000, max: 30000, factor: 2 };
const options: CaddyChatOptions = {
  token: tokens[0],
  WebSocket: FakeSocket,
  backoff: { initial: 500 }, // each field optional
  stableAfter: 10000,
  maxQueued: 100,
  requestTimeout: 10000,
  maxFrameSize: 65536,
  maxRetries: Infinity,
  random: Math.random,
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (handle) => globalThis.clearTimeout(handle),
  transports: ["websocket", "sse"],
  fallbackAfter: 2,
  queryToken: "token",
  withCredentials: false,
};

// A test's fake EventSource and fetch, like client/caddychat.test.mjs's.
class FakeEventSource implements EventSourceLike {
  readyState = 0;
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  constructor(
    readonly url: string,
    readonly init?: { withCredentials?: boolean },
  ) {}
  close(): void {}
}
const fakeFetch: FetchLike = async (_url, init) => {
  const session: string | undefined = init.headers["Caddychat-Session"];
  void session;
  return { ok: true, status: 202, json: async () => ({ accepted: true }) };
};
new CaddyChat("wss://example.test/ws", { EventSource: FakeEventSource, fetch: fakeFetch, transports: ["sse"] });
// The browser's own EventSource and fetch fit the options.
const esCtor: EventSourceConstructor = EventSource;
new CaddyChat("wss://example.test/ws", { EventSource: globalThis.EventSource, fetch: globalThis.fetch, queryToken: null });
// Forced to a WebSocket: no fallback.
new CaddyChat("wss://example.test/ws", { transports: ["websocket"] });
const order2: readonly Transport[] = TRANSPORTS;
// @ts-expect-error no such transport
new CaddyChat("wss://example.test/ws", { transports: ["longpoll"] });
// @ts-expect-error fallbackAfter is a count
new CaddyChat("wss://example.test/ws", { fallbackAfter: "2" });

// The browser's own WebSocket (the default) fits the option.
const browser = new CaddyChat(`wss://${location.host}/ws`, { WebSocket: globalThis.WebSocket });
const ctor: WebSocketConstructor = WebSocket;
// Options are optional, and every option is.
new CaddyChat("wss://example.test/ws");
new CaddyChat("wss://example.test/ws", {});
const chat = new CaddyChat("wss://example.test/ws", options);

// @ts-expect-error the URL is a string
new CaddyChat(new URL("wss://example.test/ws"));
// @ts-expect-error a token is a string (or a function returning one)
new CaddyChat("wss://example.test/ws", { token: 42 });
// @ts-expect-error no such option
new CaddyChat("wss://example.test/ws", { reconnect: false });
// @ts-expect-error backoff is an object of numbers
new CaddyChat("wss://example.test/ws", { backoff: { initial: "1s" } });

// ---- state ----

const url: string = chat.url;
const state: ConnectionState = chat.state;
const welcome: Welcome | null = chat.welcome;
const channels: readonly string[] = chat.channels;
const serverChannels: readonly string[] = chat.serverChannels;
const transport: Transport = chat.transport;
expectType<Equal<typeof transport, "websocket" | "sse">>();
expectType<Equal<typeof state, "connecting" | "connected" | "reconnecting" | "closed">>();
if (welcome) {
  const { conn, node, user }: { conn: string; node: string; user: string } = welcome;
  void [conn, node, user];
}
// @ts-expect-error read-only
chat.state = "closed";
// @ts-expect-error read-only
chat.serverChannels = [];
// @ts-expect-error read-only
chat.transport = "sse";

// ---- subscribe / unsubscribe / position ----

async function subscribing(): Promise<void> {
  const sub: Subscription = await chat.subscribe("room:eng", (m) => show(m.from, String(m.data)), { history: 50 });
  const reply: SubscribeReply = sub.reply;
  const ch: string = sub.channel;
  const recovered: boolean | undefined = reply.recovered;
  const replayed: number | undefined = reply.replayed;
  const limited: boolean | undefined = reply.limited;
  const epoch: string | undefined = reply.epoch;
  void [ch, recovered, replayed, limited, epoch];
  await sub.unsubscribe();

  // A typed payload.
  type Chat = { text: string };
  await chat.subscribe<Chat>("room:eng", (m: Message<Chat>) => show(m.from, m.data.text));
  // Without a listener (events only).
  await chat.subscribe("room:ops");

  // Resume from a stored position, as the README says: subscribe(channel, fn, position).
  const pos = chat.position("room:eng");
  expectType<Equal<typeof pos, { since: string; epoch: string | null } | null>>();
  if (pos) await chat.subscribe("room:eng", undefined, pos);
  const resume: SubscribeOptions = { since: "1764060000000-0", epoch: "9f2c41d07a3b" };
  await chat.subscribe("room:eng", () => {}, resume);
  const stored: SubscribeOptions = JSON.parse(localStorage.getItem("pos") ?? "{}");
  await chat.subscribe("room:eng", () => {}, stored);

  const done: void = await chat.unsubscribe("room:eng");
  void done;

  // @ts-expect-error history is a count
  await chat.subscribe("room:eng", () => {}, { history: "all" });
  // @ts-expect-error channels are strings
  await chat.subscribe(7);
}

function onMessage(m: Message): void {
  const id: string = m.id;
  const ch: string = m.channel;
  const from: string = m.from;
  const ts: number = m.ts;
  const data: JSONValue = m.data;
  const epoch: string | undefined = m.epoch;
  const anonymous: true | undefined = m.anonymous;
  const server: true | undefined = m.server;
  const type: "message" = m.type;
  void [id, ch, from, ts, data, epoch, anonymous, server, type];
}

// ---- publish / history / presence / refresh / close ----

async function requests(): Promise<void> {
  const id: string = await chat.publish("room:eng", { text: "hi" });
  await chat.publish("room:eng", "plain text");
  const typing: void = await chat.publish("room:eng", { typing: true }, { ephemeral: true });
  void typing;
  await chat.publish("room:eng", [1, true, null, { nested: ["x"] }]);
  void id;
  // @ts-expect-error data is a JSON value: not undefined (the client rejects it with bad_request)
  await chat.publish("room:eng", undefined);
  // @ts-expect-error nor a function
  await chat.publish("room:eng", () => {});
  // @ts-expect-error the channel is a string
  await chat.publish(1, "x");

  const page: HistoryPage = await chat.history("room:eng", { limit: 50 });
  const older = await chat.history<{ text: string }>("room:eng", { limit: 50, before: page.messages[0]?.id });
  const texts: string[] = older.messages.map((m) => m.data.text);
  const more: boolean = page.more;
  const epoch: string | null = page.epoch;
  await chat.history("room:eng");
  void [texts, more, epoch];
  // @ts-expect-error limit is a number
  await chat.history("room:eng", { limit: "50" });

  const users: PresenceUser[] = await chat.presence("room:eng");
  for (const { user, connections } of users) show(user, String(connections));

  const ok = await chat.refresh();
  expectType<Equal<typeof ok, { type: "ok"; id?: number | string } | null>>();
  await chat.refresh("eyJ...");
  // @ts-expect-error a token is a string
  await chat.refresh(42);

  const closed: void = chat.close();
  void closed;
}

// ---- events ----

const off: () => void = chat.on("state", (s) => {
  const st: ConnectionState = s;
  void st;
});
off();
chat.on("welcome", (w: Welcome) => show(w.user, w.node));
chat.on("message", onMessage);
chat.on("presence", (e: PresenceEvent) => {
  const kind: "join" | "leave" = e.type;
  show(e.user, `${kind} ${e.channel}`);
});
// The server API subscribed this connection: adopt the channel with a
// listener (kept from then on), as the README shows.
chat.on("subscribed", async ({ channel }: SubscribedEvent) => {
  const sub: Subscription = await chat.subscribe(channel, (m) => show(m.from, String(m.data)));
  const reply: SubscribeReply = sub.reply;
  void reply;
});
chat.on("unsubscribed", (e: UnsubscribedEvent) => {
  const ch: string = e.channel;
  const kept: boolean = chat.channels.includes(ch);
  show("", `removed from ${ch} (${kept})`);
});
// @ts-expect-error the event is {channel}, not a Message
chat.on("subscribed", (m: Message) => void m);
chat.on("resubscribed", ({ channel, reply, resumed }: ResubscribedEvent) => {
  const r: SubscribeReply = reply;
  const b: boolean = resumed;
  void [channel, r, b];
});
chat.on("gap", (gap: GapEvent) => {
  const reason: "not_recovered" | "no_resume_point" | "history_lost" | "late" = gap.reason;
  const reply: SubscribeReply | null = gap.reply;
  const lost: boolean | undefined = gap.historyLost;
  const missed: number | undefined = gap.missed;
  const notice: string | null = describeGap(gap);
  const fromParts: string | null = describeGap({ reason, reply, historyLost: lost, missed });
  void [notice, fromParts];
});
chat.on("disconnect", (d: DisconnectEvent) => {
  const code: number = d.code;
  const reason: string = d.reason;
  const wasOpen: boolean = d.wasOpen;
  const willReconnect: boolean = d.willReconnect;
  const delay: number | null = d.delay;
  const permanent: boolean = PERMANENT_CLOSE_CODES.includes(code) || code === TOKEN_EXPIRED;
  // The server API's disconnect and revoke: tell the user why (the reason is the server's).
  const byServer: boolean = code === DISCONNECTED_BY_SERVER && !willReconnect;
  const revoked: boolean = code === TOKEN_REVOKED;
  void [reason, wasOpen, willReconnect, delay, permanent, byServer, revoked];
});
chat.on("transport", ({ transport, previous }: TransportEvent) => {
  show("", `now over ${transport === "sse" ? "server-sent events" : "WebSocket"} (was ${previous})`);
});
chat.on("welcome", (w: Welcome) => {
  const over: "sse" | undefined = w.transport;
  const session: string | undefined = w.session;
  void [over, session];
});
chat.on("error", (err: Error) => {
  if (err instanceof CaddyChatError) {
    const code: ErrorCode = err.code;
    const ch: string | undefined = err.channel;
    const closeCode: number | undefined = err.closeCode;
    void [code, ch, closeCode];
  }
});
const listener = (e: CaddyChatEvents["gap"]): void => void e;
chat.on("gap", listener);
chat.off("gap", listener);

// @ts-expect-error no such event
chat.on("reconnect", () => {});
// @ts-expect-error a state listener gets a ConnectionState, not a Message
chat.on("state", (m: Message) => void m);
// @ts-expect-error off takes the listener
chat.off("gap");

// ---- errors ----

async function errors(): Promise<void> {
  try {
    await chat.publish("room:eng", { text: "hi" });
  } catch (err) {
    if (err instanceof CaddyChatError) {
      switch (err.code) {
        case "forbidden":
        case "unavailable":
        case "rate_limited":
        case "timeout":
        case "disconnected":
        case "queue_full":
        case "closed":
        case "too_large":
          show("", err.message);
      }
    }
  }
  const e = new CaddyChatError("timeout", "no reply", { channel: "room:eng" });
  const asError: Error = e;
  const newer = new CaddyChatError("a_code_from_a_newer_server");
  void [asError, newer];
  // @ts-expect-error the code is read-only
  e.code = "closed";
}

// ---- helpers ----

const isId: boolean = isStreamId("1764060000000-0");
const unknownId: unknown = JSON.parse("1");
if (isStreamId(unknownId)) {
  const narrowed: string = unknownId;
  void narrowed;
}
const order: number = compareStreamIds("1-0", "2-0");
const delay: number = backoffDelay(3);
backoffDelay(3, backoff as Required<BackoffOptions>, Math.random);
// @ts-expect-error backoffDelay's backoff has every field (the default is used only when it is omitted)
backoffDelay(3, { initial: 1000 });
const codes: readonly number[] = PERMANENT_CLOSE_CODES;
const expired: 4002 = TOKEN_EXPIRED;
const kicked: 4005 = DISCONNECTED_BY_SERVER;
const revokedCode: 4006 = TOKEN_REVOKED;
// @ts-expect-error the constants are their literal codes
const wrongCode: 4002 = TOKEN_REVOKED;

void [browser, ctor, esCtor, order2, transport, url, channels, serverChannels, subscribing, requests, errors, isId, order, delay, codes, expired, kicked, revokedCode, wrongCode];
