// Type declarations for caddychat.js, the browser client of caddychat's JSON protocol.

/** Any JSON value. */
export type JSONValue = string | number | boolean | null | JSONValue[] | { [key: string]: JSONValue };

/** A token, or a function asked for one on every (re)connect and by refresh(). */
export type TokenSource = string | null | undefined | (() => string | null | undefined | Promise<string | null | undefined>);

/**
 * A handler the client sets on the socket. Declared bivariant (as a method is),
 * so that sockets whose handlers take richer events (the browser's own, with
 * `(this: WebSocket, ev: MessageEvent) => any`) fit.
 */
export type SocketHandler<E> = { bivarianceHack(ev: E): void }["bivarianceHack"];

/** The subset of the WebSocket constructor the client uses (browsers' own, or a fake in tests). */
export interface WebSocketLike {
  onopen: SocketHandler<unknown> | null;
  onmessage: SocketHandler<{ data: unknown }> | null;
  onclose: SocketHandler<{ code: number; reason?: string }> | null;
  onerror: SocketHandler<unknown> | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** The transports: a WebSocket, or server-sent events with the ops POSTed (PROTOCOL.md, "SSE transport"). */
export type Transport = "websocket" | "sse";

/** The subset of the EventSource constructor the client uses (browsers' own, or a fake in tests). */
export interface EventSourceLike {
  /** 0 connecting (also while it reconnects by itself), 1 open, 2 closed (it gave up). */
  readonly readyState: number;
  onmessage: SocketHandler<{ data: unknown }> | null;
  onerror: SocketHandler<unknown> | null;
  close(): void;
}
export type EventSourceConstructor = new (url: string, init?: { withCredentials?: boolean }) => EventSourceLike;

/** The subset of fetch the client uses to POST ops over SSE. */
export type FetchLike = (
  url: string,
  init: { method: string; headers: Record<string, string>; body: string; credentials: "include" | "same-origin" },
) => Promise<{ ok: boolean; status: number; json(): Promise<unknown> }>;

/** Each field omitted takes its default; none may be undefined (it would replace the default). */
export interface BackoffOptions {
  /** Ceiling of the first reconnect's delay, ms. Default 1000. */
  initial?: number;
  /** Largest ceiling, ms. Default 30000. */
  max?: number;
  /** Growth of the ceiling per attempt. Default 2. */
  factor?: number;
}

/** Every option may be omitted or undefined: it then takes its default. */
export interface CaddyChatOptions {
  /**
   * Sent as the subprotocol pair ["caddychat", "bearer.<token>"] on a WebSocket, in the
   * query parameter queryToken over SSE. Omit for cookie or anonymous auth.
   */
  token?: TokenSource;
  /** Defaults to globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor | undefined;
  /** For the SSE transport. Defaults to globalThis.EventSource. */
  EventSource?: EventSourceConstructor | null | undefined;
  /** POSTs the ops over SSE. Defaults to globalThis.fetch. */
  fetch?: FetchLike | null | undefined;
  /**
   * The transports to try, in order; those the environment lacks are left out.
   * Default ["websocket", "sse"]; ["sse"] or ["websocket"] forces one.
   */
  transports?: readonly Transport[] | undefined;
  /** Connects in a row that end before the welcome after which the next transport is tried. Default 2. */
  fallbackAfter?: number | undefined;
  /**
   * Over SSE (an EventSource sends no headers), the query parameter that carries the
   * token: the route's `query_token` name. Default "token"; null leaves the token out
   * (cookie auth).
   */
  queryToken?: string | null | undefined;
  /** Sends cookies cross-origin: the EventSource's withCredentials, the POSTs' credentials "include". Default false. */
  withCredentials?: boolean | undefined;
  /** Reconnect delay = random(0, min(max, initial·factor^attempt)). */
  backoff?: BackoffOptions | undefined;
  /** A connection up this long (ms) resets the attempt counter. Default 10000. */
  stableAfter?: number | undefined;
  /** Requests (publish, history, presence) that may wait for a connection. Default 100. */
  maxQueued?: number | undefined;
  /** A request without a reply after this long (ms) rejects with code "timeout". Default 10000. */
  requestTimeout?: number | undefined;
  /** Largest frame sent (bytes); larger requests reject with "too_large". Match the route's max_message_size. Default 65536. */
  maxFrameSize?: number | undefined;
  /** Consecutive reconnect attempts without a stable connection before giving up (state "closed"). Default Infinity. */
  maxRetries?: number | undefined;
  /** Random source in [0, 1), for the jitter. Default Math.random. */
  random?: (() => number) | undefined;
  /** Timer functions, injectable for tests. Default the global ones. */
  setTimeout?: ((fn: () => void, ms: number) => unknown) | undefined;
  clearTimeout?: ((handle: any) => void) | undefined;
}

export type ConnectionState = "connecting" | "connected" | "reconnecting" | "closed";

/** Error codes: the server's, plus the client's own. */
export type ErrorCode =
  | "bad_request"
  | "forbidden"
  | "unauthorized"
  | "limit_exceeded"
  | "too_large"
  | "rate_limited"
  | "rejected"
  | "unavailable"
  | "internal"
  | "timeout"
  | "disconnected"
  | "queue_full"
  | "closed"
  | "unsubscribed"
  | "token"
  | "connect"
  | "bad_frame"
  | (string & {});

export class CaddyChatError extends Error {
  constructor(code: ErrorCode, message?: string, details?: object);
  readonly code: ErrorCode;
  /** Set on subscribe failures. */
  channel?: string;
  /** Set when the server closed the connection for good. */
  closeCode?: number;
}

/**
 * A delivery. On channels with history, `id` is a stream id (`<ms>-<seq>`) and `epoch` is set.
 * An ephemeral message (`ephemeral: true`) has neither: test `ephemeral` before using `id`.
 */
export interface Message<T = JSONValue> {
  type: "message";
  channel: string;
  id: string;
  epoch?: string;
  /** Set (true) on an ephemeral publish's delivery: never kept, no id. */
  ephemeral?: true;
  /** The publisher's user info (user_info_claim, or the connect hook's), when it has some. */
  info?: { [key: string]: JSONValue };
  /** The publisher's authenticated user, "" for an anonymous client or a backend. */
  from: string;
  /** Set (true) on messages of a client without a token. */
  anonymous?: true;
  /** Set (true) on a backend's messages (plain Redis PUBLISH, or the publish key); no client can produce it. */
  server?: true;
  /** With anonymous, on routes with guest_names: the guest id the publisher's node gave it. */
  guest?: string;
  /** With anonymous, on routes with guest_names: the name the publisher picked, not verified. */
  name?: string;
  /** Publish time, Unix ms. */
  ts: number;
  data: T;
}

export interface SubscribeReply {
  type: "ok";
  id?: number | string;
  channel: string;
  /** With since: whether everything after since was replayed. */
  recovered?: boolean;
  epoch?: string;
  replayed?: number;
  /** The replay hit max_replay. */
  limited?: boolean;
}

export interface Subscription {
  channel: string;
  reply: SubscribeReply;
  /** Removes this listener; the last one leaving unsubscribes the channel. */
  unsubscribe(): Promise<void>;
}

export interface SubscribeOptions {
  /** Start with the channel's last N kept messages (first subscribe only). */
  history?: number | undefined;
  /** Resume after this stream id (e.g. one stored across page loads), with its epoch: position()'s result fits. */
  since?: string | null | undefined;
  epoch?: string | null | undefined;
}

export interface HistoryOptions {
  /** Messages per page. The server's default is 50, its maximum the route's max_replay. */
  limit?: number | undefined;
  /** Messages older than this id; the newest without it. */
  before?: string | undefined;
}

export interface HistoryPage<T = JSONValue> {
  /** Oldest first. */
  messages: Message<T>[];
  /** Older messages remain: page on with before = messages[0].id. */
  more: boolean;
  epoch: string | null;
}

/** A user, or (guest_names) a guest: user "", anonymous, its guest id and the name it picked. */
export interface PresenceUser {
  user: string;
  anonymous?: true;
  guest?: string;
  name?: string;
  connections: number;
  /** The user's info, of its most recent connection to join (user_info_claim, or the connect hook's). */
  info?: { [key: string]: JSONValue };
}

export interface PresenceEvent {
  type: "join" | "leave";
  channel: string;
  user: string;
  anonymous?: true;
  guest?: string;
  name?: string;
  /** The user's info, when it has some. */
  info?: { [key: string]: JSONValue };
}

export interface Welcome {
  type: "welcome";
  conn: string;
  node: string;
  /** "" when anonymous. */
  user: string;
  /** On routes with guest_names, for an anonymous connection: its guest id and the name it asked for (?name=). */
  guest?: string;
  name?: string;
  /** The user's info (user_info_claim, or the connect hook's), when it has some. */
  info?: { [key: string]: JSONValue };
  /** Over SSE: "sse", and the session the client POSTs its ops with (a secret). */
  transport?: "sse";
  session?: string;
}

export interface DisconnectEvent {
  code: number;
  reason: string;
  /** Whether the socket had opened (false: the connect itself failed, e.g. an HTTP refusal). */
  wasOpen: boolean;
  willReconnect: boolean;
  /** The reconnect delay in ms, or null when not reconnecting. */
  delay: number | null;
}

export interface ResubscribedEvent {
  channel: string;
  reply: SubscribeReply;
  /** Sent with since (a position was known). */
  resumed: boolean;
}

export interface GapEvent {
  channel: string;
  /** The subscribe reply; null for history_lost. */
  reply: SubscribeReply | null;
  /**
   * not_recovered: the server said recovered:false (reload, e.g. with history()).
   * no_resume_point: resubscribed without since (a channel without history, or no
   * message seen yet), so messages published while disconnected may be missing.
   * history_lost: a live message came with a new epoch: the server lost the
   * channel's history (e.g. Redis restarted without persistence) while the
   * connection stayed up; it delivers the new history whole, and only messages
   * sent just before the loss may be missing.
   * late: the server skipped `missed` messages that were later than its max_lag.
   */
  reason: "not_recovered" | "no_resume_point" | "history_lost" | "late";
  /**
   * late: how many of the channel's messages the server did not send because
   * they were later than its max_lag (it was overloaded); never delivered
   * late. On a channel with history, history() can read them.
   */
  missed?: number;
  /**
   * The history the position pointed into was lost (the epoch changed): for
   * not_recovered, the replay then holds the whole new history, so only
   * messages from before the loss may be missing.
   */
  historyLost?: boolean;
}

/**
 * The server API subscribed this connection to `channel`; its messages follow,
 * to the `message` event (and to the listeners of an app that subscribe()s to
 * it, which adopts it). Not resubscribed after a reconnect unless adopted.
 */
export interface SubscribedEvent {
  channel: string;
}

/**
 * The server API unsubscribed this connection from `channel`. A channel the app
 * subscribed itself is dropped too: not resubscribed after a reconnect.
 */
export interface UnsubscribedEvent {
  channel: string;
}

/** The client moved to another transport (see CaddyChatOptions.transports and fallbackAfter). */
export interface TransportEvent {
  transport: Transport;
  previous: Transport;
}

export interface CaddyChatEvents {
  state: ConnectionState;
  welcome: Welcome;
  /** Every delivery: of the channels the client keeps, and of those only the server subscribed. */
  message: Message;
  presence: PresenceEvent;
  subscribed: SubscribedEvent;
  unsubscribed: UnsubscribedEvent;
  resubscribed: ResubscribedEvent;
  gap: GapEvent;
  disconnect: DisconnectEvent;
  transport: TransportEvent;
  error: Error;
}

export const PERMANENT_CLOSE_CODES: readonly number[];
/** The transports, in the default order of trying them. */
export const TRANSPORTS: readonly ["websocket", "sse"];
/** The token's exp passed without a refresh: reconnects only with a token function. */
export const TOKEN_EXPIRED: 4002;
/** The server API disconnected this client (the reason is the API caller's): no reconnect. */
export const DISCONNECTED_BY_SERVER: 4005;
/** The token was revoked (server API revoke): reconnects only with a token function, as after 4002. */
export const TOKEN_REVOKED: 4006;
export function isStreamId(id: unknown): id is string;
export function compareStreamIds(a: string, b: string): number;
/** A sentence telling a user what a `gap` event means, in words true for its cause; null for a gap that needs no notice. */
export function describeGap(gap: { reason: GapEvent["reason"]; reply: SubscribeReply | null; historyLost?: boolean | undefined; missed?: number | undefined }): string | null;
export function backoffDelay(attempt: number, backoff?: Required<BackoffOptions>, random?: () => number): number;

export interface OwnMessagesOptions {
  /** Where the ids are kept across page loads, e.g. sessionStorage; none by default. */
  storage?: Pick<Storage, "getItem" | "setItem"> | null | undefined;
  /** The storage key; "caddychat.own" by default. */
  key?: string | undefined;
  /** Most message ids (and guest ids) kept; 500 by default. */
  max?: number | undefined;
}

/** Which messages are this page's own, across reloads, from what the server said only. */
export class OwnMessages {
  constructor(options?: OwnMessagesOptions);
  /** Notes a welcome frame: its user, or its guest id. */
  welcome(welcome: Welcome): void;
  /** Notes the message id a publish resolved with. */
  published(id: string): void;
  isOwn(msg: Message<unknown>): boolean;
}

export interface PublishOptions {
  /** The publish's idempotency key: 1 to 128 bytes of visible ASCII. Default: a fresh random UUID. */
  idempotencyKey?: string;
}

/** An ephemeral publish: to the current subscribers only, never kept, not echoed to this connection. */
export interface EphemeralPublishOptions {
  ephemeral: true;
}

/** A fresh idempotency key: a random UUID (or 128 random bits in hex). */
export function newIdempotencyKey(): string;

export class CaddyChat {
  constructor(url: string, options?: CaddyChatOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** The transport in use, or tried next. */
  readonly transport: Transport;
  readonly welcome: Welcome | null;
  /** Channels kept subscribed across reconnects. */
  readonly channels: string[];
  /** Channels the server subscribed this connection to and the client does not keep: lost on a reconnect. */
  readonly serverChannels: string[];

  on<K extends keyof CaddyChatEvents>(event: K, fn: (arg: CaddyChatEvents[K]) => void): () => void;
  off<K extends keyof CaddyChatEvents>(event: K, fn: (arg: CaddyChatEvents[K]) => void): void;

  /**
   * Resolves once the server confirmed. A channel in serverChannels is adopted at
   * once, without a frame or a replay (reply {type: "ok", channel}), and kept from then on.
   */
  subscribe<T = JSONValue>(channel: string, onMessage?: (msg: Message<T>) => void, options?: SubscribeOptions): Promise<Subscription>;
  /** Leaves the channel: one the app subscribed, or one the server did. */
  unsubscribe(channel: string): Promise<void>;
  /** Where a reconnect would resume the channel (or the app, one the server subscribed), or null. */
  position(channel: string): { since: string; epoch: string | null } | null;

  /**
   * Resolves with the message id. Each publish carries an idempotency key
   * (fresh, or options.idempotencyKey); an authenticated client sends a
   * publish whose reply a dropped connection lost again, with the same key,
   * after reconnecting, and the server delivers it once.
   */
  /** An ephemeral publish (typing indicators): resolves with undefined once the broker took it. */
  publish(channel: string, data: JSONValue, options: EphemeralPublishOptions): Promise<void>;
  publish(channel: string, data: JSONValue, options?: PublishOptions): Promise<string>;
  history<T = JSONValue>(channel: string, options?: HistoryOptions): Promise<HistoryPage<T>>;
  presence(channel: string): Promise<PresenceUser[]>;
  /** Moves the open connection to a new token; null when disconnected. */
  refresh(token?: string): Promise<{ type: "ok"; id?: number | string } | null>;
  close(): void;
}
