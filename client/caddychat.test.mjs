// Unit tests for caddychat.js: node --test /work/main/client/
// No network: a fake WebSocket plays the server, a manual clock drives every timer.

import { test } from "node:test";
import assert from "node:assert/strict";
import { CaddyChat, CaddyChatError, DISCONNECTED_BY_SERVER, OwnMessages, TOKEN_REVOKED, TRANSPORTS, backoffDelay, compareStreamIds, describeGap, isStreamId } from "./caddychat.js";

const flush = () => new Promise((resolve) => setImmediate(resolve));

// Timers run only when the test advances time, in due order.
class FakeClock {
  now = 0;
  #seq = 0;
  timers = new Map(); // id → {at, ms, fn}

  setTimeout = (fn, ms) => {
    const id = ++this.#seq;
    this.timers.set(id, { at: this.now + ms, ms, fn });
    return id;
  };

  clearTimeout = (id) => {
    this.timers.delete(id);
  };

  async advance(ms) {
    const end = this.now + ms;
    for (;;) {
      let next = null;
      for (const [id, t] of this.timers) if (t.at <= end && (!next || t.at < next[1].at)) next = [id, t];
      if (!next) break;
      this.timers.delete(next[0]);
      this.now = next[1].at;
      next[1].fn();
      await flush();
    }
    this.now = end;
    await flush();
  }

  delays() {
    return [...this.timers.values()].map((t) => t.ms);
  }
}

class FakeWebSocket {
  static instances = [];
  readyState = 0;
  sent = [];
  closedWith = null;
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;

  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    FakeWebSocket.instances.push(this);
  }

  static get last() {
    return FakeWebSocket.instances.at(-1);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error("InvalidStateError: not open");
    this.sent.push(JSON.parse(text));
  }

  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }

  // ---- the server's side ----
  open() {
    this.readyState = 1;
    this.onopen?.({});
    this.receive({ type: "welcome", conn: "c1", node: "n1", user: "alice" });
  }

  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason, wasClean: code !== 1006 });
  }

  ops(op) {
    return this.sent.filter((f) => f.op === op);
  }

  lastOp(op) {
    return this.ops(op).at(-1);
  }

  ok(frame, extra = {}) {
    this.receive({ type: "ok", id: frame.id, channel: frame.channel, ...extra });
  }
}

function setup(options = {}) {
  FakeWebSocket.instances = [];
  const clock = new FakeClock();
  const client = new CaddyChat("ws://chat.test/ws", {
    WebSocket: FakeWebSocket,
    setTimeout: clock.setTimeout,
    clearTimeout: clock.clearTimeout,
    random: () => 0.5,
    backoff: { initial: 1000, max: 8000, factor: 2 },
    stableAfter: 10000,
    ...options,
  });
  const events = [];
  for (const name of ["state", "disconnect", "resubscribed", "gap", "error", "presence", "welcome", "subscribed", "unsubscribed"]) {
    client.on(name, (arg) => events.push([name, arg]));
  }
  return { clock, client, events };
}

// Opens the pending socket; answers its subscribes ok when `answer` is set.
async function connect(answer = true) {
  await flush();
  const ws = FakeWebSocket.last;
  ws.open();
  if (answer) for (const f of ws.ops("subscribe")) ws.ok(f);
  await flush();
  return ws;
}

// Drops the socket and runs the reconnect timer, leaving a new, unopened socket.
async function dropAndWait(clock, ws, code = 1006) {
  const before = FakeWebSocket.instances.length;
  ws.drop(code);
  await clock.advance(60000);
  assert.equal(FakeWebSocket.instances.length, before + 1, `reconnected after ${code}`);
  return FakeWebSocket.last;
}

function msg(channel, id, epoch, data = id) {
  return { type: "message", channel, id, ...(epoch ? { epoch } : {}), from: "bob", ts: 1, data };
}

function reconnectDelays(events) {
  return events.filter(([n]) => n === "disconnect").map(([, e]) => e.delay);
}

// ---- helpers ----

test("backoffDelay is full jitter within [0, min(max, initial*factor^attempt))", () => {
  const b = { initial: 100, max: 1000, factor: 3 };
  assert.equal(backoffDelay(0, b, () => 0), 0);
  assert.equal(backoffDelay(0, b, () => 0.999), 99.9);
  assert.equal(backoffDelay(2, b, () => 0.5), 450);
  assert.equal(backoffDelay(3, b, () => 0.5), 500, "capped at max");
  assert.equal(backoffDelay(500, b, () => 0.5), 500, "no overflow for large attempts");
  for (let attempt = 0; attempt < 20; attempt++) {
    const d = backoffDelay(attempt, b);
    assert.ok(d >= 0 && d < Math.min(1000, 100 * 3 ** attempt), `attempt ${attempt}: ${d}`);
  }
});

test("stream ids compare exactly and other ids are not stream ids", () => {
  assert.ok(isStreamId("1764060000000-0"));
  assert.ok(!isStreamId("1764060000000-k3j9x-42"));
  assert.ok(!isStreamId("1764060000000-12-42"));
  assert.ok(!isStreamId(undefined));
  assert.ok(compareStreamIds("1764060000000-9", "1764060000000-10") < 0);
  assert.ok(compareStreamIds("999-5", "1000-0") < 0);
  assert.equal(compareStreamIds("17-3", "17-3"), 0);
  // Beyond 2^53: a float comparison would call these equal.
  assert.ok(compareStreamIds("1-9007199254740993", "1-9007199254740992") > 0);
});

// ---- connecting and reconnecting ----

test("token goes as the caddychat + bearer subprotocol pair; the token function is called on every connect", async () => {
  let n = 0;
  const { clock } = setup({ token: async () => `t${++n}` });
  let ws = await connect();
  assert.deepEqual(ws.protocols, ["caddychat", "bearer.t1"]);
  assert.equal(ws.url, "ws://chat.test/ws");
  ws = await dropAndWait(clock, ws, 1001);
  assert.deepEqual(ws.protocols, ["caddychat", "bearer.t2"]);
  ws = await dropAndWait(clock, ws, 1006);
  assert.deepEqual(ws.protocols, ["caddychat", "bearer.t3"]);
  assert.equal(n, 3);
});

test("without a token only caddychat is offered (cookie or anonymous auth)", async () => {
  setup();
  const ws = await connect();
  assert.deepEqual(ws.protocols, ["caddychat"]);
});

test("states: connecting, connected, reconnecting, connected, closed; welcome is kept", async () => {
  const { clock, client, events } = setup();
  assert.equal(client.state, "connecting");
  const ws = await connect();
  assert.equal(client.state, "connected");
  assert.equal(client.welcome.user, "alice");
  ws.drop(1012);
  assert.equal(client.state, "reconnecting");
  await clock.advance(60000);
  assert.equal(client.state, "reconnecting");
  await connect();
  client.close();
  const states = events.filter(([n]) => n === "state").map(([, s]) => s);
  assert.deepEqual(states, ["connected", "reconnecting", "connected", "closed"]);
  assert.ok(events.some(([n]) => n === "welcome"));
});

test("backoff grows with full jitter and is capped while connects keep failing", async () => {
  const { clock, events } = setup({ random: () => 0.5 });
  for (let i = 0; i < 6; i++) {
    await flush();
    const ws = FakeWebSocket.last;
    ws.drop(1006); // refused before open (HTTP 401/429/503 look like this in browsers)
    assert.deepEqual(clock.delays(), [reconnectDelays(events).at(-1)], "the reconnect timer is the only timer");
    await clock.advance(clock.delays()[0]);
  }
  // 0.5 × min(8000, 1000·2^n)
  assert.deepEqual(reconnectDelays(events), [500, 1000, 2000, 4000, 4000, 4000]);
  assert.equal(FakeWebSocket.instances.length, 7);
});

test("backoff delay stays within the jitter window for any random value", async () => {
  let r = 0;
  const values = [0, 0.999999, 0.25, 0.999999, 0];
  const { clock, events } = setup({ random: () => values[r++] });
  for (let i = 0; i < values.length; i++) {
    await flush();
    FakeWebSocket.last.drop(1006);
    await clock.advance(10000);
  }
  const delays = reconnectDelays(events);
  const ceilings = [1000, 2000, 4000, 8000, 8000];
  delays.forEach((d, i) => assert.ok(d >= 0 && d < ceilings[i], `delay ${i} = ${d}`));
  assert.equal(delays[0], 0);
  assert.ok(delays[1] > 1999);
  assert.equal(delays[2], 1000);
});

test("the attempt counter resets once a connection stayed up for stableAfter", async () => {
  const { clock, events } = setup();
  for (let i = 0; i < 3; i++) {
    await flush();
    FakeWebSocket.last.drop(1006);
    await clock.advance(10000);
  }
  // Up, but not for long: the counter keeps growing.
  let ws = await connect();
  await clock.advance(9000);
  ws.drop(1001);
  await clock.advance(10000);
  assert.deepEqual(reconnectDelays(events), [500, 1000, 2000, 4000]);
  // Up for stableAfter: the next drop starts over at the smallest window.
  ws = await connect();
  await clock.advance(10000);
  ws.drop(1001);
  assert.deepEqual(reconnectDelays(events), [500, 1000, 2000, 4000, 500]);
});

for (const code of [1003, 1007, 1008, 1009]) {
  test(`no reconnect after permanent close code ${code}`, async () => {
    const { clock, client, events } = setup();
    const ws = await connect();
    const queuedLater = [];
    ws.drop(code);
    assert.equal(client.state, "closed");
    const d = events.find(([n]) => n === "disconnect")[1];
    assert.equal(d.code, code);
    assert.equal(d.willReconnect, false);
    await clock.advance(10 * 60 * 1000);
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.equal(clock.timers.size, 0);
    queuedLater.push(client.publish("room:a", 1));
    await assert.rejects(queuedLater[0], { code: "closed" });
  });
}

for (const code of [1000, 1001, 1006, 1011, 1012, 1013, 4000, 4001, 4003]) {
  test(`reconnects after close code ${code}`, async () => {
    const { clock, client } = setup();
    const ws = await connect();
    const next = await dropAndWait(clock, ws, code);
    assert.equal(client.state, "reconnecting");
    next.open();
    assert.equal(client.state, "connected");
  });
}

test("4002 token expired: reconnects with a fresh token from a token function", async () => {
  let n = 0;
  const { clock } = setup({ token: () => `t${++n}` });
  const ws = await connect();
  const next = await dropAndWait(clock, ws, 4002);
  assert.deepEqual(next.protocols, ["caddychat", "bearer.t2"]);
});

test("4002 token expired: a fixed token string does not reconnect", async () => {
  const { clock, client } = setup({ token: "fixed" });
  const ws = await connect();
  ws.drop(4002);
  await clock.advance(60000);
  assert.equal(client.state, "closed");
  assert.equal(FakeWebSocket.instances.length, 1);
});

test("the close code constants are the server's", () => {
  assert.equal(DISCONNECTED_BY_SERVER, 4005);
  assert.equal(TOKEN_REVOKED, 4006);
});

test("4005 disconnected by the server: no reconnect, even with a token function; the code and reason are surfaced", async () => {
  let n = 0;
  const { clock, client, events } = setup({ token: () => `t${++n}` });
  const ws = await connect();
  const inFlight = client.publish("room:a", 1);
  ws.drop(4005, "kicked by a moderator");
  assert.equal(client.state, "closed");
  const d = events.find(([e]) => e === "disconnect")[1];
  assert.deepEqual(d, { code: 4005, reason: "kicked by a moderator", wasOpen: true, willReconnect: false, delay: null });
  await assert.rejects(inFlight, (err) => err.code === "closed" && err.closeCode === 4005 && /kicked by a moderator/.test(err.message));
  await clock.advance(10 * 60 * 1000);
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.equal(n, 1, "no new token asked for");
  assert.equal(clock.timers.size, 0);
});

test("4006 token revoked: reconnects with a fresh token from a token function", async () => {
  let n = 0;
  const { clock, client, events } = setup({ token: () => `t${++n}` });
  const ws = await connect();
  const next = await dropAndWait(clock, ws, 4006);
  assert.deepEqual(next.protocols, ["caddychat", "bearer.t2"]);
  assert.equal(events.find(([e]) => e === "disconnect")[1].willReconnect, true);
  next.open();
  assert.equal(client.state, "connected");
});

for (const [what, token] of [["a fixed token string", "fixed"], ["no token (cookie auth)", undefined]]) {
  test(`4006 token revoked: ${what} does not reconnect`, async () => {
    const { clock, client, events } = setup({ token });
    const ws = await connect();
    ws.drop(4006, "token revoked");
    await clock.advance(60000);
    assert.equal(client.state, "closed");
    assert.equal(FakeWebSocket.instances.length, 1);
    const d = events.find(([e]) => e === "disconnect")[1];
    assert.equal(d.code, 4006);
    assert.equal(d.reason, "token revoked");
    assert.equal(d.willReconnect, false);
  });
}

test("a failing token function is reported and retried with backoff", async () => {
  let calls = 0;
  const { clock, events } = setup({
    token: async () => {
      if (++calls === 1) throw new Error("idp down");
      return "ok";
    },
  });
  await flush();
  assert.equal(FakeWebSocket.instances.length, 0);
  const err = events.find(([n]) => n === "error")[1];
  assert.equal(err.code, "token");
  await clock.advance(1000);
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.deepEqual(FakeWebSocket.last.protocols, ["caddychat", "bearer.ok"]);
});

test("maxRetries gives up after that many failed attempts in a row", async () => {
  const { clock, client } = setup({ maxRetries: 2 });
  const p = assert.rejects(client.publish("room:a", 1), { code: "closed" });
  for (let i = 0; i < 3; i++) {
    await flush();
    FakeWebSocket.last.drop(1006);
    await clock.advance(10000);
  }
  assert.equal(client.state, "closed");
  assert.equal(FakeWebSocket.instances.length, 3);
  await p;
});

// ---- subscriptions and resume ----

test("subscribe resolves with the ok reply and delivers messages", async () => {
  const { client } = setup();
  const ws = await connect();
  const got = [];
  const p = client.subscribe("room:a", (m) => got.push(m.data), { history: 20 });
  const f = ws.lastOp("subscribe");
  assert.equal(f.channel, "room:a");
  assert.equal(f.history, 20);
  assert.equal(typeof f.id, "number");
  ws.ok(f, { epoch: "e1", replayed: 1 });
  ws.receive(msg("room:a", "100-0", "e1", "old"));
  const sub = await p;
  assert.equal(sub.reply.replayed, 1);
  assert.equal(sub.channel, "room:a");
  ws.receive(msg("room:a", "101-0", "e1", "live"));
  ws.receive(msg("room:b", "102-0", "e1", "other channel"));
  assert.deepEqual(got, ["old", "live"]);
  assert.deepEqual(client.position("room:a"), { since: "101-0", epoch: "e1" });
});

test("subscribe rejects with the server's error code and is not resubscribed", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  const p = client.subscribe("secret", () => {});
  ws.receive({ type: "error", id: ws.lastOp("subscribe").id, code: "forbidden", message: "may not subscribe to secret" });
  await assert.rejects(p, (err) => err instanceof CaddyChatError && err.code === "forbidden" && /secret/.test(err.message));
  assert.deepEqual(client.channels, []);
  ws = await dropAndWait(clock, ws);
  ws.open();
  assert.equal(ws.ops("subscribe").length, 0);
});

test("subscribes made while connecting go out once connected", async () => {
  const { client } = setup();
  const p = client.subscribe("room:a", () => {});
  const ws = await connect();
  assert.equal(ws.ops("subscribe").length, 1);
  assert.ok((await p).reply);
});

test("after a reconnect every channel is resubscribed with since + epoch of its last delivered message", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  client.subscribe("room:a", () => {});
  client.subscribe("room:b", () => {});
  client.subscribe("plain", () => {});
  client.subscribe("quiet", () => {}, { history: 20 });
  for (const f of ws.ops("subscribe")) ws.ok(f);
  ws.receive(msg("room:a", "100-0", "ea"));
  ws.receive(msg("room:a", "105-3", "ea"));
  ws.receive(msg("room:b", "200-1", "eb"));
  ws.receive(msg("plain", "1764060000000-k3j9x-42")); // not a history channel: no position
  ws = await dropAndWait(clock, ws, 1001);
  ws.open();
  const subs = Object.fromEntries(ws.ops("subscribe").map((f) => [f.channel, f]));
  assert.deepEqual(Object.keys(subs), ["room:a", "room:b", "plain", "quiet"], "in subscribe order");
  assert.equal(subs["room:a"].since, "105-3");
  assert.equal(subs["room:a"].epoch, "ea");
  assert.equal(subs["room:b"].since, "200-1");
  assert.equal(subs["room:b"].epoch, "eb");
  assert.equal(subs.plain.since, undefined, "a non-stream id is no position");
  assert.equal(subs.quiet.since, undefined);
  assert.equal(subs.quiet.history, 20, "nothing seen yet: start with history again");
});

test("duplicates after a resume are dropped; newer messages and a new epoch go through", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  const got = [];
  client.subscribe("room:a", (m) => got.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "100-0", "e1"));
  ws.receive(msg("room:a", "100-1", "e1"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  ws.ok(ws.lastOp("subscribe"), { recovered: true, epoch: "e1", replayed: 2 });
  ws.receive(msg("room:a", "100-1", "e1")); // the last one seen again
  ws.receive(msg("room:a", "99-5", "e1")); // older
  ws.receive(msg("room:a", "100-2", "e1"));
  ws.receive(msg("room:a", "100-2", "e1")); // live copy of a replayed one
  ws.receive(msg("room:a", "101-0", "e1"));
  ws.receive(msg("room:a", "50-0", "e2")); // history lost and restarted: a new epoch is not a duplicate
  assert.deepEqual(got, ["100-0", "100-1", "100-2", "101-0", "50-0"]);
});

test("recovered:false emits a gap event and delivery goes on", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  const got = [];
  client.subscribe("room:a", (m) => got.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "100-0", "e1"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  const f = ws.lastOp("subscribe");
  ws.ok(f, { recovered: false, limited: true, epoch: "e1", replayed: 1000 });
  const gap = events.find(([n]) => n === "gap")[1];
  assert.equal(gap.channel, "room:a");
  assert.equal(gap.reason, "not_recovered");
  assert.equal(gap.reply.limited, true);
  const re = events.find(([n]) => n === "resubscribed")[1];
  assert.equal(re.resumed, true);
  ws.receive(msg("room:a", "200-0", "e1"));
  assert.deepEqual(got, ["100-0", "200-0"]);
});

test("a gap frame (late messages the server skipped) emits a late gap with the count; delivery goes on", async () => {
  const { client, events } = setup();
  const ws = await connect();
  const got = [];
  client.subscribe("room:a", (m) => got.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "100-0", "e1"));
  ws.receive({ type: "gap", channel: "room:a", missed: 17 });
  ws.receive({ type: "gap", channel: "room:a", missed: "many" }); // malformed: ignored
  ws.receive(msg("room:a", "300-0", "e1"));
  assert.deepEqual(named(events, "gap"), [{ channel: "room:a", reply: null, reason: "late", missed: 17 }]);
  assert.deepEqual(got, ["100-0", "300-0"]);
  assert.match(describeGap(named(events, "gap")[0]), /^17 messages were not shown/);
});

test("recovered:true emits resubscribed but no gap", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  client.subscribe("room:a", () => {});
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "100-0", "e1"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  ws.ok(ws.lastOp("subscribe"), { recovered: true, epoch: "e1", replayed: 0 });
  assert.equal(events.filter(([n]) => n === "resubscribed").length, 1);
  assert.equal(events.filter(([n]) => n === "gap").length, 0);
});

test("a channel resubscribed without a position reports a no_resume_point gap", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  client.subscribe("plain", () => {});
  ws.ok(ws.lastOp("subscribe"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  ws.ok(ws.lastOp("subscribe"));
  const gap = events.find(([n]) => n === "gap")[1];
  assert.equal(gap.reason, "no_resume_point");
});

test("a new epoch in the resume reply forgets the old position", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  const got = [];
  client.subscribe("room:a", (m) => got.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "900-0", "e1"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  ws.ok(ws.lastOp("subscribe"), { recovered: false, epoch: "e2", replayed: 0 });
  ws.receive(msg("room:a", "10-0", "e2"));
  assert.deepEqual(got, ["900-0", "10-0"]);
  assert.deepEqual(client.position("room:a"), { since: "10-0", epoch: "e2" });
});

test("an app-supplied since/epoch is sent on the first subscribe", async () => {
  const { client } = setup();
  const ws = await connect();
  const p = client.subscribe("room:a", () => {}, { since: "5-0", epoch: "e9" });
  const f = ws.lastOp("subscribe");
  assert.equal(f.since, "5-0");
  assert.equal(f.epoch, "e9");
  ws.ok(f, { recovered: true, epoch: "e9", replayed: 0 });
  assert.equal((await p).reply.recovered, true);
});

test("a resubscribe answered unavailable is retried after a backoff delay", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  client.subscribe("room:a", () => {});
  ws.ok(ws.lastOp("subscribe"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  let f = ws.lastOp("subscribe");
  ws.receive({ type: "error", id: f.id, code: "unavailable", message: "broker down" });
  assert.equal(events.find(([n]) => n === "error")[1].code, "unavailable");
  await clock.advance(1000);
  assert.equal(ws.ops("subscribe").length, 2);
  f = ws.lastOp("subscribe");
  ws.ok(f);
  assert.deepEqual(client.channels, ["room:a"]);
});

test("unsubscribe sends the op and stops delivery; the handle removes one listener", async () => {
  const { client } = setup();
  const ws = await connect();
  const a = [];
  const b = [];
  const pa = client.subscribe("room:a", (m) => a.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  const subA = await pa;
  const subB = await client.subscribe("room:a", (m) => b.push(m.id));
  assert.equal(ws.ops("subscribe").length, 1, "second listener reuses the subscription");
  subA.unsubscribe();
  assert.equal(ws.ops("unsubscribe").length, 0);
  ws.receive(msg("room:a", "1-0"));
  const done = subB.unsubscribe();
  const u = ws.lastOp("unsubscribe");
  assert.equal(u.channel, "room:a");
  ws.ok(u);
  await done;
  ws.receive(msg("room:a", "2-0"));
  assert.deepEqual(a, []);
  assert.deepEqual(b, ["1-0"]);
});

// ---- subscriptions made and ended by the server (the server API) ----

function named(events, name) {
  return events.filter(([n]) => n === name).map(([, e]) => e);
}

test("subscribed: the event, then the channel's messages reach the message event; not resubscribed after a reconnect", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  const got = [];
  client.on("message", (m) => got.push(`${m.channel} ${m.id}`));
  ws.receive(msg("room:1", "1-0", "e1")); // before the server subscribed: not this connection's
  ws.receive({ type: "subscribed", channel: "room:1" });
  assert.deepEqual(named(events, "subscribed"), [{ channel: "room:1" }]);
  assert.deepEqual(client.serverChannels, ["room:1"]);
  assert.deepEqual(client.channels, [], "not the app's: not kept");
  ws.receive(msg("room:1", "2-0", "e1"));
  ws.receive(msg("room:1", "3-0", "e1"));
  assert.deepEqual(got, ["room:1 2-0", "room:1 3-0"]);
  assert.deepEqual(client.position("room:1"), { since: "3-0", epoch: "e1" }, "where the app is, should it store it");
  assert.equal(ws.ops("subscribe").length, 0, "the client sent nothing");

  ws = await dropAndWait(clock, ws);
  ws.open();
  assert.equal(ws.ops("subscribe").length, 0, "the server does not subscribe a new connection again, nor does the client");
  assert.deepEqual(client.serverChannels, []);
  ws.receive(msg("room:1", "4-0", "e1"));
  assert.deepEqual(got, ["room:1 2-0", "room:1 3-0"]);
});

test("subscribed: subscribe() adopts the channel without a frame; its listener gets the messages and a reconnect resumes it", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  ws.receive({ type: "subscribed", channel: "room:1" });
  ws.receive(msg("room:1", "5-0", "e1"));
  const mine = [];
  const sub = await client.subscribe("room:1", (m) => mine.push(m.id), { history: 50 });
  assert.deepEqual(sub.reply, { type: "ok", channel: "room:1" });
  assert.equal(ws.ops("subscribe").length, 0, "the connection holds it: a subscribe with history would be refused");
  assert.deepEqual(client.channels, ["room:1"]);
  assert.deepEqual(client.serverChannels, [], "the app's now");
  assert.deepEqual(client.position("room:1"), { since: "5-0", epoch: "e1" }, "from the last message the app got, through the message event");
  ws.receive(msg("room:1", "5-0", "e1")); // a duplicate of what the app got is dropped
  ws.receive(msg("room:1", "6-0", "e1"));
  assert.deepEqual(mine, ["6-0"]);

  ws = await dropAndWait(clock, ws);
  ws.open();
  const f = ws.lastOp("subscribe");
  assert.equal(f.channel, "room:1");
  assert.equal(f.since, "6-0");
  assert.equal(f.epoch, "e1");
});

test("subscribed for a channel the app subscribed itself changes nothing but the event", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  const mine = [];
  const got = [];
  client.on("message", (m) => got.push(m.id));
  client.subscribe("room:1", (m) => mine.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive({ type: "subscribed", channel: "room:1" });
  ws.receive(msg("room:1", "1-0", "e1"));
  assert.deepEqual([mine, got], [["1-0"], ["1-0"]], "delivered once");
  assert.equal(named(events, "subscribed").length, 1);
  assert.deepEqual(client.serverChannels, []);
  ws = await dropAndWait(clock, ws);
  ws.open();
  assert.equal(ws.lastOp("subscribe").since, "1-0", "still resubscribed");
});

test("unsubscribed: a channel the app subscribed is dropped, the app told, and not resubscribed after a reconnect", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  const mine = [];
  client.subscribe("room:1", (m) => mine.push(m.id));
  client.subscribe("room:2", () => {});
  for (const f of ws.ops("subscribe")) ws.ok(f);
  ws.receive(msg("room:1", "1-0", "e1"));
  ws.receive({ type: "unsubscribed", channel: "room:1" });
  assert.deepEqual(named(events, "unsubscribed"), [{ channel: "room:1" }]);
  assert.deepEqual(client.channels, ["room:2"]);
  assert.equal(client.position("room:1"), null);
  ws.receive(msg("room:1", "2-0", "e1"));
  assert.deepEqual(mine, ["1-0"]);
  assert.equal(ws.ops("unsubscribe").length, 0, "the server did it already");

  ws = await dropAndWait(clock, ws);
  ws.open();
  assert.deepEqual(ws.ops("subscribe").map((f) => f.channel), ["room:2"]);
});

test("unsubscribed: a channel only the server subscribed stops reaching the message event", async () => {
  const { client, events } = setup();
  const ws = await connect();
  const got = [];
  client.on("message", (m) => got.push(m.id));
  ws.receive({ type: "subscribed", channel: "room:1" });
  ws.receive(msg("room:1", "1-0"));
  ws.receive({ type: "unsubscribed", channel: "room:1" });
  ws.receive(msg("room:1", "2-0"));
  ws.receive({ type: "unsubscribed", channel: "room:9" }); // neither the app's nor the server's: no event
  assert.deepEqual(got, ["1-0"]);
  assert.deepEqual(client.serverChannels, []);
  assert.deepEqual(named(events, "unsubscribed"), [{ channel: "room:1" }]);
});

test("unsubscribed before the reply of the app's own subscribe: the reply decides, the channel is kept", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  const p = client.subscribe("room:1", () => {});
  const f = ws.lastOp("subscribe");
  // The server API subscribes and unsubscribes the connection before the
  // server reads the app's subscribe, which then subscribes it again.
  ws.receive({ type: "subscribed", channel: "room:1" });
  ws.receive({ type: "unsubscribed", channel: "room:1" });
  ws.ok(f);
  await p;
  assert.deepEqual(client.channels, ["room:1"]);
  assert.deepEqual(named(events, "unsubscribed"), [], "the client did not lose it");
  ws = await dropAndWait(clock, ws);
  ws.open();
  assert.equal(ws.lastOp("subscribe").channel, "room:1");
});

test("unsubscribe() leaves a channel the server subscribed; a subscribed frame before its ok is undone by it", async () => {
  const { client } = setup();
  const ws = await connect();
  const got = [];
  client.on("message", (m) => got.push(m.id));
  ws.receive({ type: "subscribed", channel: "room:1" });
  const done = client.unsubscribe("room:1");
  const u = ws.lastOp("unsubscribe");
  assert.equal(u.channel, "room:1");
  ws.receive(msg("room:1", "1-0")); // sent before the server read the unsubscribe
  ws.receive({ type: "subscribed", channel: "room:1" }); // the API, before the unsubscribe was read
  ws.ok(u);
  await done;
  assert.deepEqual(client.serverChannels, []);
  ws.receive(msg("room:1", "2-0"));
  assert.deepEqual(got, []);
});

test("presence events are emitted", async () => {
  const { events } = setup();
  const ws = await connect();
  ws.receive({ type: "join", channel: "room:a", user: "bob" });
  ws.receive({ type: "leave", channel: "room:a", user: "bob" });
  const p = events.filter(([n]) => n === "presence").map(([, e]) => e.type);
  assert.deepEqual(p, ["join", "leave"]);
});

// ---- requests ----

test("publish resolves with the message id", async () => {
  const { client } = setup();
  const ws = await connect();
  const p = client.publish("room:a", { text: "hi" });
  const f = ws.lastOp("publish");
  assert.deepEqual(f.data, { text: "hi" });
  ws.receive({ type: "ok", id: f.id, channel: "room:a", message_id: "7-0" });
  assert.equal(await p, "7-0");
});

test("an ephemeral publish carries the flag, no idempotency key, and resolves with undefined", async () => {
  const { client } = setup();
  const ws = await connect();
  const p = client.publish("room:a", { typing: true }, { ephemeral: true });
  const f = ws.lastOp("publish");
  assert.equal(f.ephemeral, true);
  assert.equal(f.idempotency_key, undefined);
  assert.deepEqual(f.data, { typing: true });
  ws.receive({ type: "ok", id: f.id, channel: "room:a" });
  assert.equal(await p, undefined);
});

test("publish rejects with the server's error code", async () => {
  const { client } = setup();
  const ws = await connect();
  const p1 = client.publish("room:x", 1);
  const p2 = client.publish("room:a", 2);
  ws.receive({ type: "error", id: ws.ops("publish")[1].id, code: "unavailable", message: "retry later" });
  ws.receive({ type: "error", id: ws.ops("publish")[0].id, code: "forbidden", message: "may not publish on room:x" });
  await assert.rejects(p1, { code: "forbidden", message: "may not publish on room:x" });
  await assert.rejects(p2, { code: "unavailable" });
});

test("publishes made while disconnected are queued, sent in order after resubscription, and resolve", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  client.subscribe("room:a", () => {});
  ws.ok(ws.lastOp("subscribe"));
  ws = await dropAndWait(clock, ws);
  const p1 = client.publish("room:a", 1);
  const p2 = client.publish("room:a", 2);
  ws.open();
  assert.equal(ws.ops("publish").length, 0, "publishes wait for the resubscribe's answer");
  ws.ok(ws.lastOp("subscribe"));
  const pubs = ws.ops("publish");
  assert.deepEqual(pubs.map((f) => f.data), [1, 2]);
  assert.ok(ws.sent.indexOf(pubs[0]) > ws.sent.indexOf(ws.lastOp("subscribe")));
  for (const f of pubs) ws.receive({ type: "ok", id: f.id, channel: f.channel, message_id: `id${f.data}` });
  assert.deepEqual(await Promise.all([p1, p2]), ["id1", "id2"]);
});

test("publishes before the first connection are queued too", async () => {
  const { client } = setup();
  const p = client.publish("room:a", "early");
  const ws = await connect();
  const f = ws.lastOp("publish");
  assert.equal(f.data, "early");
  ws.receive({ type: "ok", id: f.id, message_id: "1-0" });
  assert.equal(await p, "1-0");
});

test("the queue rejects with queue_full beyond maxQueued", async () => {
  const { client } = setup({ maxQueued: 2 });
  const p1 = client.publish("room:a", 1);
  const p2 = client.publish("room:a", 2);
  await assert.rejects(client.publish("room:a", 3), { code: "queue_full" });
  const ws = await connect();
  assert.deepEqual(ws.ops("publish").map((f) => f.data), [1, 2]);
  for (const f of ws.ops("publish")) ws.receive({ type: "ok", id: f.id, message_id: "x" });
  await Promise.all([p1, p2]);
});

test("every publish carries a fresh idempotency key, or the app's", async () => {
  const { client } = setup();
  const ws = await connect();
  client.publish("room:a", 1);
  client.publish("room:a", 2);
  client.publish("room:a", 3, { idempotencyKey: "mine-1" });
  const keys = ws.ops("publish").map((f) => f.idempotency_key);
  assert.equal(keys.length, 3);
  assert.match(keys[0], /^[\x21-\x7e]{16,128}$/);
  assert.notEqual(keys[0], keys[1]);
  assert.equal(keys[2], "mine-1");
});

test("a publish in flight when the connection drops is sent again after the reconnect, with the same key", async () => {
  const { clock, client } = setup();
  let ws = await connect();
  const p1 = client.publish("room:a", 1);
  const p2 = client.publish("room:a", 2);
  const [first1, first2] = ws.ops("publish");
  ws = await dropAndWait(clock, ws);
  const p3 = client.publish("room:a", 3); // queued while disconnected: after the resent ones
  ws.open();
  const again = ws.ops("publish");
  assert.deepEqual(again.map((f) => f.data), [1, 2, 3]);
  assert.equal(again[0].idempotency_key, first1.idempotency_key);
  assert.equal(again[1].idempotency_key, first2.idempotency_key);
  assert.notEqual(again[2].idempotency_key, first1.idempotency_key);
  ws.receive({ type: "ok", id: again[0].id, message_id: "m1", duplicate: true });
  ws.receive({ type: "ok", id: again[1].id, message_id: "m2" });
  ws.receive({ type: "ok", id: again[2].id, message_id: "m3" });
  assert.deepEqual(await Promise.all([p1, p2, p3]), ["m1", "m2", "m3"]);
});

test("an anonymous client's publish in flight when the connection drops rejects with disconnected and is not resent", async () => {
  const { clock, client } = setup();
  await flush();
  let ws = FakeWebSocket.last;
  ws.readyState = 1;
  ws.onopen?.({});
  ws.receive({ type: "welcome", conn: "c1", node: "n1", user: "", anonymous: true });
  await flush();
  const p = assert.rejects(client.publish("room:a", 1), { code: "disconnected" });
  ws = await dropAndWait(clock, ws);
  await p;
  ws.open();
  assert.equal(ws.ops("publish").length, 0);
});

test("a request without a reply times out", async () => {
  const { clock, client } = setup({ requestTimeout: 5000 });
  const ws = await connect();
  const p = client.publish("room:a", 1);
  const caught = assert.rejects(p, { code: "timeout" });
  await clock.advance(5000);
  await caught;
  // A late reply is ignored.
  ws.receive({ type: "ok", id: ws.lastOp("publish").id, message_id: "late" });
});

test("a frame over maxFrameSize is refused before it can get the connection closed (1009)", async () => {
  const { client } = setup({ maxFrameSize: 1000 });
  const ws = await connect();
  await assert.rejects(client.publish("room:a", "é".repeat(600)), { code: "too_large" });
  assert.equal(ws.ops("publish").length, 0);
  client.publish("room:a", "small");
  assert.equal(ws.ops("publish").length, 1);
});

test("history and presence return their replies' contents", async () => {
  const { client } = setup();
  const ws = await connect();
  const h = client.history("room:a", { limit: 2, before: "10-0" });
  const hf = ws.lastOp("history");
  assert.deepEqual({ limit: hf.limit, before: hf.before }, { limit: 2, before: "10-0" });
  const m = [msg("room:a", "8-0", "e1"), msg("room:a", "9-0", "e1")];
  ws.receive({ type: "history", id: hf.id, channel: "room:a", epoch: "e1", messages: m, more: true });
  assert.deepEqual(await h, { messages: m, more: true, epoch: "e1" });

  const pr = client.presence("room:a");
  const users = [{ user: "alice", connections: 2 }];
  ws.receive({ type: "presence", id: ws.lastOp("presence").id, channel: "room:a", users });
  assert.deepEqual(await pr, users);
});

test("refresh sends the refresh op with a fresh token from the token function", async () => {
  let n = 0;
  const { client } = setup({ token: () => `t${++n}` });
  const ws = await connect();
  const p = client.refresh();
  await flush();
  const f = ws.lastOp("refresh");
  assert.equal(f.token, "t2");
  ws.receive({ type: "ok", id: f.id });
  assert.equal((await p).type, "ok");
});

test("unsolicited error frames and throwing listeners surface as error events", async () => {
  const { client, events } = setup();
  const ws = await connect();
  ws.receive({ type: "error", code: "bad_request", message: "frame must be a JSON object" });
  client.subscribe("room:a", () => {
    throw new Error("app bug");
  });
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "1-0"));
  const errors = events.filter(([n]) => n === "error").map(([, e]) => e.code ?? e.message);
  assert.deepEqual(errors, ["bad_request", "app bug"]);
});

// ---- close ----

test("close() closes with 1000, rejects pending and queued requests, and stops reconnecting", async () => {
  const { clock, client } = setup();
  const ws = await connect();
  const inFlight = client.publish("room:a", 1);
  const sub = client.subscribe("room:b", () => {});
  client.close();
  assert.equal(ws.closedWith, 1000);
  assert.equal(client.state, "closed");
  await assert.rejects(inFlight, { code: "closed" });
  await assert.rejects(sub, { code: "closed" });
  await assert.rejects(client.publish("room:a", 2), { code: "closed" });
  await assert.rejects(client.subscribe("room:c", () => {}), { code: "closed" });
  ws.drop(1006); // the socket's own close event comes later and changes nothing
  await clock.advance(10 * 60 * 1000);
  assert.equal(FakeWebSocket.instances.length, 1);
  assert.equal(clock.timers.size, 0, "no timer left behind");
});

test("close() while reconnecting rejects the queue and cancels the reconnect", async () => {
  const { clock, client } = setup();
  const ws = await connect();
  ws.drop(1001);
  const queued = client.publish("room:a", 1);
  client.close();
  await assert.rejects(queued, { code: "closed" });
  await clock.advance(60000);
  assert.equal(FakeWebSocket.instances.length, 1);
});

test("close() during an async token fetch opens no socket", async () => {
  let release;
  const { client } = setup({ token: () => new Promise((r) => (release = r)) });
  await flush();
  client.close();
  release("t");
  await flush();
  assert.equal(FakeWebSocket.instances.length, 0);
  assert.equal(client.state, "closed");
});

test("close() from a state listener leaves no socket or timer behind", async () => {
  const { clock, client } = setup();
  client.on("state", (s) => s === "reconnecting" && client.close());
  const ws = await connect();
  ws.drop(1001);
  assert.equal(client.state, "closed");
  assert.equal(clock.timers.size, 0);
  await clock.advance(60000);
  assert.equal(FakeWebSocket.instances.length, 1);
});

test("a resume whose epoch the server lost: a gap with historyLost, words that say so, the new epoch delivered", async () => {
  const { clock, client, events } = setup();
  let ws = await connect();
  const got = [];
  client.subscribe("room:a", (m) => got.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "100-0", "e1"));
  ws = await dropAndWait(clock, ws);
  ws.open();
  const f = ws.lastOp("subscribe");
  assert.equal(f.since, "100-0");
  assert.equal(f.epoch, "e1");
  ws.ok(f, { recovered: false, epoch: "e2", replayed: 2 });
  const gap = events.find(([n]) => n === "gap")[1];
  assert.equal(gap.reason, "not_recovered");
  assert.equal(gap.historyLost, true);
  const text = describeGap(gap);
  assert.match(text, /lost this room's earlier history/);
  assert.match(text, /All 2 messages sent since are shown/);
  assert.doesNotMatch(text, /no longer holds/);
  // The new epoch's ids may be lower: they are not duplicates.
  ws.receive(msg("room:a", "50-0", "e2"));
  ws.receive(msg("room:a", "50-1", "e2"));
  assert.deepEqual(got, ["100-0", "50-0", "50-1"]);
  assert.equal(client.position("room:a").epoch, "e2");
});

test("recovered:false in the same epoch keeps the old words; a limited replay says so", () => {
  assert.match(describeGap({ reason: "not_recovered", reply: { recovered: false, epoch: "e1", replayed: 0 }, historyLost: false }), /no longer holds them/);
  assert.match(describeGap({ reason: "not_recovered", reply: { recovered: false, limited: true, epoch: "e1", replayed: 1000 }, historyLost: false }), /only the latest 1000/);
  assert.equal(describeGap({ reason: "no_resume_point", reply: {} }), null);
});

test("a live message of a new epoch emits a history_lost gap once", async () => {
  const { client, events } = setup();
  const ws = await connect();
  const got = [];
  client.subscribe("room:a", (m) => got.push(m.id));
  ws.ok(ws.lastOp("subscribe"));
  ws.receive(msg("room:a", "100-0", "e1"));
  ws.receive(msg("room:a", "200-0", "e2"));
  ws.receive(msg("room:a", "200-1", "e2"));
  const gaps = events.filter(([n]) => n === "gap").map(([, g]) => g);
  assert.equal(gaps.length, 1);
  assert.equal(gaps[0].reason, "history_lost");
  assert.match(describeGap(gaps[0]), /lost this room's earlier history/);
  assert.deepEqual(got, ["100-0", "200-0", "200-1"]);
});

// ---- OwnMessages: which messages are this page's own ----

class MemoryStorage {
  items = new Map();
  getItem(key) {
    return this.items.has(key) ? this.items.get(key) : null;
  }
  setItem(key, value) {
    this.items.set(key, String(value));
  }
}

// A page's view of a channel as the chat page keeps it: each message shown
// once (by id), marked own when the page knows it is.
function pageView(client, own, channel) {
  const shown = new Map(); // id → {msg, own}
  const mark = () => {
    for (const entry of shown.values()) entry.own ||= own.isOwn(entry.msg);
  };
  client.subscribe(channel, (msg) => {
    if (!shown.has(msg.id)) shown.set(msg.id, { msg, own: own.isOwn(msg) });
  });
  return {
    shown,
    publish: (data) => client.publish(channel, data).then((id) => {
      own.published(id);
      mark();
      return id;
    }),
    rows: () => [...shown.values()].map((e) => `${e.msg.data}${e.own ? " (own)" : ""}`),
  };
}

test("own messages: shown once and marked own whether the message or the ok comes first", async () => {
  for (const order of ["message first", "ok first"]) {
    const { client } = setup();
    const own = new OwnMessages();
    const ws = await connect();
    own.welcome({ type: "welcome", conn: "c1", node: "n1", user: "" }); // an anonymous page, no guest id
    const view = pageView(client, own, "room:a");
    await flush();
    ws.ok(ws.lastOp("subscribe"));
    await flush();

    const sent = view.publish("hello");
    await flush();
    const pub = ws.lastOp("publish");
    const message = { type: "message", channel: "room:a", id: "1-n-1", from: "", anonymous: true, ts: 1, data: "hello" };
    if (order === "message first") {
      ws.receive(message);
      assert.deepEqual(view.rows(), ["hello"], `${order}: shown before the ok, not yet known as own`);
      ws.ok(pub, { message_id: "1-n-1" });
    } else {
      ws.ok(pub, { message_id: "1-n-1" });
      await flush();
      ws.receive(message);
    }
    assert.equal(await sent, "1-n-1");
    ws.receive(message); // a repeat (e.g. a resume racing a live copy) is not shown twice
    assert.deepEqual(view.rows(), ["hello (own)"], order);
    client.close();
  }
});

test("own messages: a guest's are its own at once, also before the ok, and after a reload", async () => {
  const storage = new MemoryStorage();
  const { client } = setup();
  let own = new OwnMessages({ storage, key: "own" });
  const ws = await connect();
  own.welcome({ type: "welcome", conn: "c1", node: "n1", user: "", guest: "00000000000000aa", name: "alice" });
  const view = pageView(client, own, "room:a");
  await flush();
  ws.ok(ws.lastOp("subscribe"));
  await flush();
  const sent = view.publish("mine");
  await flush();
  const mine = { type: "message", channel: "room:a", id: "2-n-1", from: "", anonymous: true, guest: "00000000000000aa", name: "alice", ts: 1, data: "mine" };
  ws.receive(mine); // before its ok
  assert.deepEqual(view.rows(), ["mine (own)"]);
  ws.ok(ws.lastOp("publish"), { message_id: "2-n-1" });
  await sent;
  client.close();

  // A reload: a new page, a new connection and a new guest id, the same tab storage.
  own = new OwnMessages({ storage, key: "own" });
  own.welcome({ type: "welcome", conn: "c2", node: "n1", user: "", guest: "00000000000000bb", name: "alice" });
  assert.ok(own.isOwn(mine), "the earlier connection's message is still own");
  assert.ok(own.isOwn({ ...mine, id: "3-n-1" }), "by its guest id too");
  assert.ok(!new OwnMessages({ storage: new MemoryStorage(), key: "own" }).isOwn(mine), "another tab's storage knows nothing");
});

test("own messages: only what the server said counts, never another client's claim", () => {
  const own = new OwnMessages();
  own.welcome({ type: "welcome", conn: "c1", node: "n1", user: "", guest: "00000000000000aa", name: "alice" });
  own.published("5-n-1");
  const base = { type: "message", channel: "room:a", ts: 1 };
  const cases = [
    // Another guest who picked the same name.
    [{ ...base, id: "6-n-1", from: "", anonymous: true, guest: "00000000000000cc", name: "alice", data: "x" }, false],
    // A user named like this guest's name: a user is not a guest.
    [{ ...base, id: "6-n-2", from: "alice", data: "x" }, false],
    // A message whose data claims to be this page's.
    [{ ...base, id: "6-n-3", from: "", anonymous: true, data: { guest: "00000000000000aa", id: "5-n-1", from: "alice" } }, false],
    // A backend's message.
    [{ ...base, id: "6-n-4", from: "", server: true, guest: "00000000000000aa", data: "x" }, false],
    // A plain anonymous message.
    [{ ...base, id: "6-n-5", from: "", anonymous: true, data: "x" }, false],
    // This page's guest id, and the id of its publish.
    [{ ...base, id: "6-n-6", from: "", anonymous: true, guest: "00000000000000aa", name: "alice", data: "x" }, true],
    [{ ...base, id: "5-n-1", from: "", anonymous: true, data: "x" }, true],
    [null, false],
  ];
  for (const [msg, want] of cases) assert.equal(own.isOwn(msg), want, JSON.stringify(msg));

  // A signed-in page: its user's messages, not a guest named like it.
  const signed = new OwnMessages();
  signed.welcome({ type: "welcome", conn: "c1", node: "n1", user: "alice" });
  assert.equal(signed.isOwn({ ...base, id: "7-n-1", from: "alice", data: "x" }), true);
  assert.equal(signed.isOwn({ ...base, id: "7-n-2", from: "", anonymous: true, guest: "00000000000000dd", name: "alice", data: "x" }), false);
  assert.equal(signed.isOwn({ ...base, id: "7-n-3", from: "bob", data: "x" }), false);
});

test("own messages: storage is bounded and may be broken", () => {
  const storage = new MemoryStorage();
  const own = new OwnMessages({ storage, key: "k", max: 3 });
  for (let i = 1; i <= 5; i++) own.published(`${i}-n-1`);
  assert.deepEqual(JSON.parse(storage.getItem("k")).ids, ["3-n-1", "4-n-1", "5-n-1"]);
  storage.setItem("k", "{not json");
  assert.equal(new OwnMessages({ storage, key: "k" }).isOwn({ id: "5-n-1" }), false, "unreadable storage: nothing is own");
  const throwing = { getItem() { throw new Error("denied"); }, setItem() { throw new Error("denied"); } };
  const own2 = new OwnMessages({ storage: throwing });
  own2.published("1-n-1");
  assert.equal(own2.isOwn({ id: "1-n-1" }), true, "kept for the page load");
});

// ---- the SSE transport ----

// An EventSource as the client uses it: the test plays the server's stream.
class FakeEventSource {
  static instances = [];
  static sessions = 0;
  readyState = 0;
  closed = false;
  onmessage = null;
  onerror = null;
  onopen = null;

  constructor(url, init) {
    this.url = new URL(url);
    this.init = init;
    FakeEventSource.instances.push(this);
  }

  static get last() {
    return FakeEventSource.instances.at(-1);
  }

  close() {
    this.closed = true;
    this.readyState = 2;
  }

  // ---- the server's side ----
  channels() {
    return this.url.searchParams.getAll("channel");
  }

  // The welcome (with a fresh session), then an ok without id per channel of the URL.
  open({ answer = true, user = "alice" } = {}) {
    this.readyState = 1;
    this.session = `sess-${++FakeEventSource.sessions}`;
    this.receive({ type: "welcome", conn: "c1", node: "n1", user, transport: "sse", session: this.session });
    if (answer) for (const ch of this.channels()) this.receive({ type: "ok", channel: ch });
  }

  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  // The stream dropped; the EventSource reconnects by itself (Last-Event-ID).
  drop() {
    this.readyState = 0;
    this.onerror?.({});
  }

  // An HTTP error (401, 503...): the EventSource gives up.
  refuse() {
    this.readyState = 2;
    this.onerror?.({});
  }
}

// fetch as the client uses it: records each POST, answers 202 unless told.
class FakeFetch {
  posts = [];
  answer = { status: 202, body: { accepted: true } };

  hold = null; // a promise the answers wait for

  fetch = async (url, init) => {
    this.posts.push({ url, method: init.method, headers: init.headers, frame: JSON.parse(init.body) });
    if (this.hold) await this.hold;
    const { status, body } = this.answer;
    return { ok: status >= 200 && status < 300, status, json: async () => body };
  };

  ops(op) {
    return this.posts.filter((p) => p.frame.op === op).map((p) => p.frame);
  }

  lastOp(op) {
    return this.ops(op).at(-1);
  }
}

function setupSSE(options = {}) {
  FakeEventSource.instances = [];
  const fake = new FakeFetch();
  const setupResult = setup({ EventSource: FakeEventSource, fetch: fake.fetch, ...options });
  const transports = [];
  setupResult.client.on("transport", (e) => transports.push(e));
  return { ...setupResult, fake, transports };
}

// Opens the pending event stream and lets its POSTs go out.
async function connectStream(opts) {
  await flush();
  const es = FakeEventSource.last;
  es.open(opts);
  await flush();
  return es;
}

test("TRANSPORTS: websocket first, then sse", () => {
  assert.deepEqual(TRANSPORTS, ["websocket", "sse"]);
});

test("fallback: two WebSocket connects closed before the welcome move the client to SSE at once", async () => {
  const { clock, client, transports, events } = setupSSE({ token: "tok" });
  client.subscribe("room:a", () => {});
  assert.equal(client.transport, "websocket");
  await flush();
  FakeWebSocket.last.drop(1006); // refused: never opened
  await clock.advance(60000);
  assert.equal(FakeWebSocket.instances.length, 2, "one failure: WebSocket again");
  assert.equal(FakeEventSource.instances.length, 0);
  FakeWebSocket.last.drop(1006);
  await clock.advance(0); // no backoff before the first try of the new transport
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.equal(FakeEventSource.instances.length, 1);
  assert.equal(client.transport, "sse");
  assert.deepEqual(transports, [{ transport: "sse", previous: "websocket" }]);
  assert.deepEqual(reconnectDelays(events), [500, 0]);
  const es = FakeEventSource.last;
  assert.equal(es.url.origin + es.url.pathname, "http://chat.test/ws");
  assert.deepEqual(es.channels(), ["room:a"]);
  assert.equal(es.url.searchParams.get("token"), "tok");
  es.open();
  await flush();
  assert.equal(client.state, "connected");
  assert.equal(client.welcome.session, es.session);
});

test("fallback: a WebSocket opened but closed before its welcome counts too; one welcomed resets the count", async () => {
  const { clock, client } = setupSSE();
  await flush();
  let ws = FakeWebSocket.last;
  ws.readyState = 1;
  ws.onopen({}); // open, no welcome
  ws.drop(1006);
  await clock.advance(60000);
  ws = await connect(); // welcomed
  ws.drop(1006);
  await clock.advance(60000);
  FakeWebSocket.last.drop(1006); // one failure since the welcome
  await clock.advance(60000);
  assert.equal(client.transport, "websocket");
  assert.equal(FakeEventSource.instances.length, 0);
  FakeWebSocket.last.drop(1006); // the second in a row
  await clock.advance(0);
  assert.equal(client.transport, "sse");
  assert.equal(FakeEventSource.instances.length, 1);
});

test("fallback: fallbackAfter sets how many failures move the client", async () => {
  const { clock, client } = setupSSE({ fallbackAfter: 1 });
  await flush();
  FakeWebSocket.last.drop(1006);
  await clock.advance(0);
  assert.equal(client.transport, "sse");
  assert.equal(FakeEventSource.instances.length, 1);
});

test("fallback: a WebSocket that cannot be constructed moves the client to SSE at once, for good", async () => {
  class Throwing {
    constructor() {
      throw new Error("SecurityError");
    }
  }
  const { clock, client, events } = setupSSE({ WebSocket: Throwing });
  await flush();
  await clock.advance(0);
  assert.equal(client.transport, "sse");
  assert.equal(FakeEventSource.instances.length, 1);
  assert.ok(events.some(([n, e]) => n === "error" && e.code === "connect"));
  const es = await connectStream();
  es.refuse();
  await clock.advance(60000);
  FakeEventSource.last.refuse();
  await clock.advance(60000);
  assert.equal(client.transport, "sse", "no WebSocket to go back to");
  assert.equal(FakeEventSource.instances.length, 3);
});

test("fallback: SSE failing before its welcome goes back to WebSocket", async () => {
  const { clock, client, transports } = setupSSE({ fallbackAfter: 1 });
  await flush();
  FakeWebSocket.last.drop(1006);
  await clock.advance(0);
  FakeEventSource.last.refuse();
  assert.ok(FakeEventSource.last.closed);
  await clock.advance(0);
  assert.equal(client.transport, "websocket");
  assert.equal(FakeWebSocket.instances.length, 2);
  assert.deepEqual(transports.map((t) => t.transport), ["sse", "websocket"]);
});

test("forced transport: transports [\"sse\"] opens only event streams", async () => {
  const { client } = setupSSE({ transports: ["sse"] });
  assert.equal(client.transport, "sse");
  await flush();
  assert.equal(FakeWebSocket.instances.length, 0);
  assert.equal(FakeEventSource.instances.length, 1);
});

test("forced transport: transports [\"websocket\"] never falls back", async () => {
  const { clock, client } = setupSSE({ transports: ["websocket"] });
  await flush();
  for (let i = 0; i < 5; i++) {
    FakeWebSocket.last.drop(1006);
    await clock.advance(60000);
  }
  assert.equal(client.transport, "websocket");
  assert.equal(FakeEventSource.instances.length, 0);
  assert.equal(FakeWebSocket.instances.length, 6);
});

test("forced transport: an unknown transport or a missing implementation is refused", () => {
  assert.throws(() => new CaddyChat("ws://x/ws", { WebSocket: FakeWebSocket, transports: ["longpoll"] }), TypeError);
  assert.throws(() => new CaddyChat("ws://x/ws", { WebSocket: FakeWebSocket, transports: [] }), TypeError);
  // Node 20 has no global EventSource.
  assert.throws(() => new CaddyChat("ws://x/ws", { WebSocket: FakeWebSocket, EventSource: null, transports: ["sse"] }), /EventSource/);
});

test("SSE: ops are POSTed to the route with the welcome's session; replies on the stream are correlated by id", async () => {
  const { client, fake } = setupSSE({ transports: ["sse"] });
  const es = await connectStream();
  const p1 = client.publish("room:a", { text: "one" });
  const p2 = client.history("room:a", { limit: 5 });
  await flush();
  assert.equal(fake.posts.length, 2);
  for (const post of fake.posts) {
    assert.equal(post.url, "http://chat.test/ws");
    assert.equal(post.method, "POST");
    assert.equal(post.headers["Caddychat-Session"], es.session);
    assert.equal(post.headers["Content-Type"], "application/json");
  }
  const pub = fake.lastOp("publish");
  const hist = fake.lastOp("history");
  assert.deepEqual(pub.data, { text: "one" });
  assert.equal(hist.limit, 5);
  assert.notEqual(pub.id, hist.id);
  // Answered out of order: each reply settles its own request.
  es.receive({ type: "history", id: hist.id, channel: "room:a", messages: [msg("room:a", "1-0")], more: false });
  es.receive({ type: "ok", id: pub.id, channel: "room:a", message_id: "9-0" });
  assert.equal(await p1, "9-0");
  assert.deepEqual((await p2).messages.map((m) => m.id), ["1-0"]);
});

test("SSE: POSTs go one after another, in the order of the ops", async () => {
  const { client, fake } = setupSSE({ transports: ["sse"] });
  const es = await connectStream();
  let release;
  fake.hold = new Promise((r) => (release = r));
  const p1 = client.publish("room:a", 1);
  const p2 = client.publish("room:a", 2);
  await flush();
  assert.deepEqual(fake.ops("publish").map((f) => f.data), [1], "the second waits for the first POST's answer");
  fake.hold = null;
  release();
  await flush();
  assert.deepEqual(fake.ops("publish").map((f) => f.data), [1, 2]);
  for (const f of fake.ops("publish")) es.receive({ type: "ok", id: f.id, message_id: `${f.data}-0` });
  assert.deepEqual(await Promise.all([p1, p2]), ["1-0", "2-0"]);
});

test("SSE: channels subscribed before the open are in the stream's URL and answered by it; later ones are POSTed", async () => {
  const { client, fake, events } = setupSSE({ transports: ["sse"] });
  const got = [];
  const sa = client.subscribe("room:a", (m) => got.push(m.id), { history: 10 });
  const sb = client.subscribe("room:b", () => {}, { history: 10 });
  await flush();
  const es = FakeEventSource.last;
  assert.deepEqual(es.channels(), ["room:a", "room:b"]);
  assert.equal(es.url.searchParams.get("history"), "10");
  es.open();
  const [a, b] = await Promise.all([sa, sb]);
  assert.equal(a.reply.channel, "room:a");
  assert.equal(b.reply.channel, "room:b");
  assert.equal(fake.posts.length, 0, "nothing POSTed for the stream's own channels");
  es.receive(msg("room:a", "5-0", "e1"));
  assert.deepEqual(got, ["5-0"]);
  const sc = client.subscribe("room:c", () => {});
  await flush();
  const sub = fake.lastOp("subscribe");
  assert.equal(sub.channel, "room:c");
  es.receive({ type: "ok", id: sub.id, channel: "room:c" });
  assert.equal((await sc).channel, "room:c");
  // An error answer without id rejects that channel's subscribe.
  const { client: c2 } = setupSSE({ transports: ["sse"] });
  const sx = c2.subscribe("room:x", () => {});
  await flush();
  FakeEventSource.last.open({ answer: false });
  FakeEventSource.last.receive({ type: "error", channel: "room:x", code: "forbidden", message: "no" });
  await assert.rejects(sx, (err) => err.code === "forbidden" && err.channel === "room:x");
  assert.ok(!events.some(([n]) => n === "error"));
});

test("SSE: a refused POST rejects its op with the body's code (or the status's); 404 means the session is gone: reconnect", async () => {
  const { clock, client, fake, events } = setupSSE({ transports: ["sse"] });
  let es = await connectStream();
  fake.answer = { status: 429, body: { error: { code: "rate_limited", message: "slow down" } } };
  await assert.rejects(client.publish("room:a", 1), (err) => err.code === "rate_limited" && err.message === "slow down");
  fake.answer = { status: 413, body: null };
  await assert.rejects(client.history("room:a"), (err) => err.code === "too_large");
  fake.answer = { status: 404, body: { error: { code: "not_found", message: "no such session" } } };
  const p = client.publish("room:a", 2); // alice: resent after the reconnect
  await flush();
  assert.ok(es.closed, "the stream of a gone session is closed");
  assert.equal(client.state, "reconnecting");
  assert.ok(events.some(([n, e]) => n === "disconnect" && e.code === 1006 && e.willReconnect));
  fake.answer = { status: 202, body: { accepted: true } };
  await clock.advance(60000);
  es = await connectStream();
  const again = fake.lastOp("publish");
  assert.equal(again.data, 2);
  assert.equal(fake.posts.at(-1).headers["Caddychat-Session"], es.session);
  es.receive({ type: "ok", id: again.id, message_id: "3-0" });
  assert.equal(await p, "3-0");
});

for (const [code, reconnects] of [[4000, true], [1001, true], [1012, true], [4005, false], [1008, false]]) {
  test(`SSE: a close event with ${code} is handled as a WebSocket close with ${code} (${reconnects ? "reconnects" : "no reconnect"})`, async () => {
    const { clock, client, events } = setupSSE({ transports: ["sse"] });
    const es = await connectStream();
    es.receive({ type: "close", code, reason: "why" });
    assert.ok(es.closed, "the EventSource is closed, not left to reconnect by itself");
    const d = events.find(([n]) => n === "disconnect")[1];
    assert.equal(d.code, code);
    assert.equal(d.reason, "why");
    assert.equal(d.willReconnect, reconnects);
    await clock.advance(60000);
    assert.equal(FakeEventSource.instances.length, reconnects ? 2 : 1);
    assert.equal(client.state, reconnects ? "reconnecting" : "closed");
  });
}

test("SSE: close 4002 and 4006 reconnect only with a token function, and the new stream has the fresh token", async () => {
  for (const code of [4002, 4006]) {
    const fixed = setupSSE({ transports: ["sse"], token: "old" });
    (await connectStream()).receive({ type: "close", code, reason: "" });
    await fixed.clock.advance(60000);
    assert.equal(fixed.client.state, "closed", `${code} with a fixed token`);
    let n = 0;
    const fn = setupSSE({ transports: ["sse"], token: () => `t${++n}`, queryToken: "access" });
    (await connectStream()).receive({ type: "close", code, reason: "" });
    await fn.clock.advance(60000);
    assert.equal(FakeEventSource.instances.length, 2, `${code} with a token function`);
    assert.equal(FakeEventSource.last.url.searchParams.get("access"), "t2");
    assert.equal(FakeEventSource.last.url.searchParams.get("token"), null);
  }
});

test("SSE: queryToken null leaves the token out of the URL (cookie auth); withCredentials reaches the EventSource", async () => {
  setupSSE({ transports: ["sse"], token: "tok", queryToken: null, withCredentials: true });
  await flush();
  assert.equal(FakeEventSource.last.url.search, "");
  assert.deepEqual(FakeEventSource.last.init, { withCredentials: true });
});

test("SSE resume: a drop lets the EventSource reconnect by itself; its new welcome resumes, POSTed channels are POSTed again with since", async () => {
  const { clock, client, fake, events } = setupSSE({ transports: ["sse"] });
  const gotA = [];
  client.subscribe("room:a", (m) => gotA.push(m.id));
  const es = await connectStream();
  const sb = client.subscribe("room:b", () => {});
  await flush();
  es.receive({ type: "ok", id: fake.lastOp("subscribe").id, channel: "room:b" });
  await sb;
  es.receive(msg("room:a", "5-0", "ea"));
  es.receive(msg("room:b", "7-0", "eb"));
  const p = client.publish("room:a", "in flight");
  await flush();
  const first = fake.lastOp("publish");
  es.drop();
  assert.ok(!es.closed, "the EventSource is left to reconnect (Last-Event-ID)");
  assert.equal(client.state, "reconnecting");
  await clock.advance(60000);
  assert.equal(FakeEventSource.instances.length, 1, "no new EventSource while it reconnects");
  const posted = fake.posts.length;
  es.open(); // the same EventSource, a new session
  await flush();
  assert.equal(client.state, "connected");
  const since = fake.posts.slice(posted).map((p) => p.frame);
  const subB = since.find((f) => f.op === "subscribe");
  assert.deepEqual({ channel: subB.channel, since: subB.since, epoch: subB.epoch }, { channel: "room:b", since: "7-0", epoch: "eb" });
  assert.ok(!since.some((f) => f.op === "subscribe" && f.channel === "room:a"), "room:a is the stream's own: resumed by Last-Event-ID");
  assert.ok(events.some(([n, e]) => n === "resubscribed" && e.channel === "room:a"));
  es.receive({ type: "ok", id: subB.id, channel: "room:b", recovered: true });
  await flush();
  const again = fake.lastOp("publish");
  assert.equal(again.idempotency_key, first.idempotency_key, "the publish in flight is resent with its key");
  assert.equal(fake.posts.at(-1).headers["Caddychat-Session"], es.session);
  es.receive(msg("room:a", "5-0", "ea")); // replayed duplicate
  es.receive(msg("room:a", "6-0", "ea"));
  assert.deepEqual(gotA, ["5-0", "6-0"]);
  es.receive({ type: "ok", id: again.id, message_id: "8-0" });
  assert.equal(await p, "8-0");
});

test("SSE resume: a refused stream is replaced by a new EventSource after backoff; channels with a position are POSTed with since + epoch", async () => {
  const { clock, client, fake } = setupSSE({ transports: ["sse"] });
  client.subscribe("room:a", () => {});
  client.subscribe("room:n", () => {}); // no message yet: no position
  let es = await connectStream();
  es.receive(msg("room:a", "5-0", "ea"));
  es.refuse();
  assert.ok(es.closed);
  assert.equal(FakeEventSource.instances.length, 1);
  await clock.advance(60000);
  assert.equal(FakeEventSource.instances.length, 2, "a new EventSource after the backoff");
  es = FakeEventSource.last;
  assert.deepEqual(es.channels(), ["room:n"], "the stream subscribes the channels without a position");
  es.open();
  await flush();
  const sub = fake.lastOp("subscribe");
  assert.deepEqual({ channel: sub.channel, since: sub.since, epoch: sub.epoch }, { channel: "room:a", since: "5-0", epoch: "ea" });
  assert.equal(fake.posts.at(-1).headers["Caddychat-Session"], es.session);
  assert.deepEqual(client.channels, ["room:a", "room:n"]);
});

test("SSE: a drop whose own reconnect fails too is taken over by the client's backoff", async () => {
  const { clock } = setupSSE({ transports: ["sse"] });
  const es = await connectStream();
  es.drop();
  es.drop(); // its reconnect failed
  assert.ok(es.closed);
  await clock.advance(60000);
  assert.equal(FakeEventSource.instances.length, 2);
});

test("SSE: close() closes the EventSource and rejects what is pending", async () => {
  const { client } = setupSSE({ transports: ["sse"] });
  const es = await connectStream();
  const p = client.publish("room:a", 1);
  client.close();
  assert.ok(es.closed);
  await assert.rejects(p, (err) => err.code === "closed");
  assert.equal(client.state, "closed");
});
