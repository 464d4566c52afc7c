// The chat page and caddychat.js over https:// and wss:// in headless
// Chromium: two nodes serve TLS with certificates of their own local CAs
// (Caddy's `tls internal`). The browser trusts those CAs' keys only
// (--ignore-certificate-errors-spki-list with their SPKI hashes, see
// cluster.mjs), and a browser without that refuses the page.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { launchBrowser, messageTexts, newChatPage, send, startAll, stopAll, waitFor, waitForMessage, waitForState } from "./cluster.mjs";

describe("chat page over wss", { timeout: 120_000 }, () => {
  let env;
  let cluster;
  let browser;

  before(async () => {
    env = await startAll({ nodes: ["a", "b"], tls: true });
    ({ cluster, browser } = env);
    if (env.error) throw env.error;
  });

  after(() => stopAll(env));

  test("two pages on two nodes exchange a message over wss", { timeout: 60_000 }, async () => {
    const room = `wss-${Date.now().toString(36)}`;
    const { a, b } = cluster.nodes;
    assert.match(a.url, /^https:/);

    const sockets = [];
    const open = async (url) => {
      const page = await newChatPage(browser);
      page.on("websocket", (ws) => sockets.push(ws.url()));
      const start = performance.now();
      await page.goto(url);
      await waitForState(page, "connected");
      page.connectedAfter = Math.round(performance.now() - start);
      return page;
    };
    const p1 = await open(`${a.url}/ws#${room}`);
    const p2 = await open(`${b.url}/ws#${room}`);
    const node1 = await p1.getAttribute("#status", "data-node");
    const node2 = await p2.getAttribute("#status", "data-node");
    assert.ok(node1 && node2 && node1 !== node2, `the pages are on different nodes (${node1}, ${node2})`);
    assert.ok(sockets.length >= 2 && sockets.every((u) => u.startsWith("wss://127.0.0.1:")), `the pages' WebSockets are wss: ${sockets}`);
    assert.equal(await p1.evaluate(() => window.isSecureContext), true, "the page is a secure context");

    await send(p1, "hello over wss from node A");
    await waitForMessage(p2, "hello over wss from node A");
    await send(p2, "and back over wss from node B");
    await waitForMessage(p1, "and back over wss from node B");
    for (const page of [p1, p2]) {
      await waitFor(async () => (await messageTexts(page)).length === 2, { what: "two messages" });
      assert.deepEqual(await messageTexts(page), ["hello over wss from node A", "and back over wss from node B"]);
      assert.deepEqual(page.problems, [], "no page error or CSP violation");
    }
    console.log(`# page load to connected over https/wss: node A ${p1.connectedAfter} ms, node B ${p2.connectedAfter} ms`);
  });

  test("a browser that does not trust the nodes' CAs refuses the page", { timeout: 60_000 }, async () => {
    const untrusting = await launchBrowser();
    try {
      const page = await (await untrusting.newContext()).newPage();
      await assert.rejects(page.goto(`${cluster.nodes.a.url}/ws`), /ERR_CERT_AUTHORITY_INVALID/);
    } finally {
      await untrusting.close();
    }
  });
});
