// The chat page where WebSocket is blocked: caddychat.js falls back to the
// route's server-sent-events transport (PROTOCOL.md, "SSE transport") and the
// page still sends and receives, across two nodes, with a page on a
// WebSocket. See README.md.
//
// Needs the server side of SSE (issue 20): without it, the page never gets a
// welcome over SSE and this test fails at "connected over SSE".

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { newChatPage, send, startAll, stopAll, waitFor, waitForMessage, waitForState } from "./cluster.mjs";

const TEST_TIMEOUT = 60_000;

describe("chat page without WebSocket", { timeout: 180_000 }, () => {
  let env;
  let cluster;
  let browser;

  before(async () => {
    env = await startAll({ nodes: ["a", "b"] });
    ({ cluster, browser } = env);
    if (env.error) throw env.error;
  });

  after(() => stopAll(env));

  test("a page whose WebSockets are refused talks over SSE with a page on a WebSocket, both ways", { timeout: TEST_TIMEOUT }, async () => {
    const room = `sse-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;
    const { a, b } = cluster.nodes;

    // Page 1: every WebSocket is refused before it reaches a node, as a
    // proxy that refuses upgrades would. Its streams and POSTs are watched.
    const p1 = await newChatPage(browser);
    const refused = [];
    await p1.routeWebSocket(/.*/, (ws) => {
      refused.push(ws.url());
      ws.close({ code: 1011, reason: "blocked by the test" });
    });
    const streams = [];
    const posts = [];
    p1.on("request", (req) => {
      if (req.resourceType() === "eventsource") streams.push({ url: req.url(), accept: req.headers()["accept"] });
      if (req.method() === "POST") posts.push({ url: req.url(), session: req.headers()["caddychat-session"], body: req.postData() });
    });
    await p1.goto(`${a.url}/ws#${room}`);
    await waitForState(p1, "connected", 20_000);
    assert.equal(await p1.getAttribute("#status", "data-transport"), "sse", "connected over SSE");
    assert.match(await p1.textContent("#status"), /connected · SSE/, "the status line says SSE");
    assert.ok(refused.length >= 2, `the WebSocket was tried first (${refused.length} refused)`);
    assert.ok(streams.length >= 1, "an EventSource was opened");
    const stream = new URL(streams[0].url);
    assert.equal(stream.pathname, "/ws");
    assert.deepEqual(stream.searchParams.getAll("channel"), [`room:${room}`], "the room is in the stream's query");
    assert.match(streams[0].accept ?? "", /text\/event-stream/);

    // Page 2 on the other node, over a WebSocket.
    const p2 = await newChatPage(browser);
    await p2.goto(`${b.url}/ws#${room}`);
    await waitForState(p2, "connected");
    assert.equal(await p2.getAttribute("#status", "data-transport"), "websocket");
    assert.match(await p2.textContent("#status"), /connected · WebSocket/);
    const node1 = await p1.getAttribute("#status", "data-node");
    const node2 = await p2.getAttribute("#status", "data-node");
    assert.ok(node1 && node2 && node1 !== node2, `the pages are on different nodes (${node1}, ${node2})`);

    await send(p1, "hello over server-sent events");
    await waitForMessage(p2, "hello over server-sent events");
    const publish = posts.find((p) => p.body?.includes("hello over server-sent events"));
    assert.ok(publish, "the publish was POSTed");
    assert.equal(new URL(publish.url).pathname, "/ws");
    assert.ok(publish.session, "with the Caddychat-Session header");
    assert.equal(JSON.parse(publish.body).op, "publish");

    await send(p2, "and back over a WebSocket");
    await waitForMessage(p1, "and back over a WebSocket");
    // Page 1's own message is shown once, as its own (the ok came on the stream).
    const mine = p1.locator("#messages .message").filter({ has: p1.locator(".text", { hasText: "hello over server-sent events" }) });
    await waitFor(async () => (await mine.count()) === 1 && (await mine.first().evaluate((el) => el.classList.contains("mine"))), {
      what: "page 1's own message, once, on the right",
    });

    for (const page of [p1, p2]) {
      assert.deepEqual(page.dialogs, [], "no dialog may open");
      assert.deepEqual(page.problems, [], "no page error or CSP violation");
    }
  });
});
