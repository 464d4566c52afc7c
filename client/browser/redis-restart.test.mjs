// Redis killed and restarted without persistence while a publisher keeps
// going: the page, connected throughout, shows every message that was
// acknowledged, including those published the moment Redis answers again
// (before the node's pub/sub subscription is back), each once, and says in
// true words that the earlier history was lost.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { messageTexts, newChatPage, startAll, stopAll, waitFor, waitForState } from "./cluster.mjs";

describe("chat page across a Redis restart", { timeout: 120_000 }, () => {
  let env;
  let cluster;
  let browser;

  before(async () => {
    env = await startAll({ nodes: ["a"] });
    ({ cluster, browser } = env);
    if (env.error) throw env.error;
  });

  after(() => stopAll(env));

  test("Redis restarted without persistence: every acknowledged message is shown once", { timeout: 90_000 }, async () => {
    const room = `restart-${Date.now().toString(36)}`;
    const channel = `room:${room}`;
    const { a } = cluster.nodes;

    const reader = await newChatPage(browser);
    await reader.goto(`${a.url}/ws#${room}`);
    await waitForState(reader, "connected");

    // The publisher: a plain WebSocket from a page of the same origin, one
    // publish at a time (~50/s), recording which texts were answered ok.
    const writer = await newChatPage(browser);
    await writer.goto(`${a.url}/ws#elsewhere-${room}`);
    await waitForState(writer, "connected");
    await writer.evaluate(({ url, channel }) => {
      const pub = (window.pub = { acked: [], unavailable: 0, errors: [], marked: [], stop: false, done: null });
      const ws = new WebSocket(url);
      let id = 0;
      const waiting = new Map();
      ws.onmessage = (e) => {
        const f = JSON.parse(e.data);
        if (f.id != null && waiting.has(f.id)) {
          waiting.get(f.id)(f);
          waiting.delete(f.id);
        }
      };
      const publish = (text) => new Promise((resolve) => {
        id++;
        waiting.set(id, resolve);
        ws.send(JSON.stringify({ op: "publish", channel, data: { text }, id }));
        setTimeout(() => { if (waiting.delete(id)) resolve({ type: "timeout" }); }, 10_000);
      });
      const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
      // Publishes text until it is acknowledged (unavailable: retried).
      pub.publishUntilOK = async (text) => {
        for (;;) {
          const r = await publish(text);
          if (r.type === "ok") return pub.acked.push(text);
          if (r.code === "unavailable" || r.type === "timeout") { pub.unavailable++; await sleep(5); continue; }
          pub.errors.push(JSON.stringify(r));
          return;
        }
      };
      pub.done = new Promise((resolve) => {
        ws.onopen = async () => {
          for (let n = 1; !pub.stop; n++) {
            const r = await publish(`load ${n}`);
            if (r.type === "ok") pub.acked.push(`load ${n}`);
            else if (r.code === "unavailable" || r.type === "timeout") pub.unavailable++;
            else pub.errors.push(JSON.stringify(r));
            await sleep(20);
          }
          resolve();
        };
      });
    }, { url: `${a.url.replace(/^http/, "ws")}/ws`, channel });

    const acked = () => writer.evaluate(() => window.pub.acked.length);
    await waitFor(async () => (await acked()) >= 50, { timeout: 20_000, what: "50 publishes before the restart" });

    await cluster.restartRedis({ down: 1000 });
    // The moment Redis answers: 10 marked messages, as fast as they are
    // acknowledged (the node's subscription is typically not back yet).
    await writer.evaluate(async () => {
      for (let i = 1; i <= 10; i++) await window.pub.publishUntilOK(`marked ${i}`);
    });
    const afterMarked = await acked();
    await waitFor(async () => (await acked()) >= afterMarked + 50, { timeout: 20_000, what: "50 publishes after the restart" });
    await writer.evaluate(async () => {
      window.pub.stop = true;
      await window.pub.done;
    });
    const pub = await writer.evaluate(() => ({ acked: window.pub.acked, unavailable: window.pub.unavailable, errors: window.pub.errors }));
    assert.deepEqual(pub.errors, [], "every publish answered ok or unavailable");
    for (let i = 1; i <= 10; i++) assert.ok(pub.acked.includes(`marked ${i}`), `marked ${i} acknowledged`);

    const shown = async () => new Set(await messageTexts(reader));
    await waitFor(async () => {
      const s = await shown();
      return pub.acked.every((t) => s.has(t));
    }, { timeout: 20_000, what: "every acknowledged message on the page" }).catch(async (err) => {
      const s = await shown();
      const missing = pub.acked.filter((t) => !s.has(t));
      err.message += `: ${missing.length} of ${pub.acked.length} acknowledged missing (first ${missing.slice(0, 12).join(", ")})`;
      throw err;
    });
    await reader.waitForTimeout(300);
    const texts = await messageTexts(reader);
    assert.equal(new Set(texts).size, texts.length, "no message shown twice");
    const notices = await reader.locator("#messages .notice").allTextContents();
    assert.ok(!notices.some((n) => /no longer holds/.test(n)), `no false claim about the history: ${JSON.stringify(notices)}`);
    assert.ok(notices.some((n) => /lost this room's earlier history/.test(n)), `the page says the history was lost: ${JSON.stringify(notices)}`);
    console.log(`# ${pub.acked.length} acknowledged (${pub.unavailable} answered unavailable), all ${texts.length} shown once; notices: ${JSON.stringify(notices)}`);
    assert.deepEqual(reader.problems, []);
  });
});
