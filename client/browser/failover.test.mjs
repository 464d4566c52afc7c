// Failover through a load balancer: a page connected via the balancer to
// node A; node A is SIGKILLed; the page reconnects through the balancer to
// node B and resumes the room, getting what was said meanwhile exactly once.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { messageTexts, newChatPage, send, startAll, stateOf, stopAll, waitFor, waitForState } from "./cluster.mjs";

const MISSED = 20;

describe("chat page behind a load balancer", { timeout: 120_000 }, () => {
  let env;
  let cluster;
  let browser;

  before(async () => {
    env = await startAll({ nodes: ["a", "b"], lb: true });
    ({ cluster, browser } = env);
    if (env.error) throw env.error;
  });

  after(() => stopAll(env));

  test("node A is killed: the page reconnects to node B and misses nothing", { timeout: 60_000 }, async () => {
    const room = `failover-${Date.now().toString(36)}`;
    const { a, b } = cluster.nodes;

    // The publisher: a page connected to node B directly.
    const writer = await newChatPage(browser);
    await writer.goto(`${b.url}/ws#${room}`);
    await waitForState(writer, "connected");
    const nodeB = await writer.getAttribute("#status", "data-node");

    // The reader: through the balancer, which sends it to node A (lb_policy
    // first). Its clock is Playwright's, so that the test decides when its
    // reconnect timer fires (below); everything else runs as usual.
    const reader = await newChatPage(browser, { clock: true });
    await reader.goto(`${cluster.lb.url}/ws#${room}`);
    await waitForState(reader, "connected");
    const nodeA = await reader.getAttribute("#status", "data-node");
    assert.ok(nodeA && nodeB && nodeA !== nodeB, `the reader is on node A (${nodeA}), the writer on node B (${nodeB})`);

    const before = ["before 1", "before 2", "before 3"];
    for (const text of before) await send(writer, text);
    await waitFor(async () => (await messageTexts(reader)).length === before.length, { what: "the first messages at the reader" });
    assert.deepEqual(await messageTexts(reader), before);

    // Hold the reader's timers, so its reconnect waits until the missed
    // messages are published; network events (the close) still arrive.
    const now = await reader.evaluate(() => Date.now());
    await reader.clock.pauseAt(now + 200);

    await a.proc.kill("SIGKILL");
    await waitForState(reader, "reconnecting", 15_000);

    const missed = Array.from({ length: MISSED }, (_, i) => `missed ${String(i + 1).padStart(2, "0")}`);
    for (const text of missed) await send(writer, text);
    // The writer gets its own messages once they are published (and kept).
    await waitFor(async () => (await messageTexts(writer)).length === before.length + MISSED, { what: "the writer's messages published" });
    assert.deepEqual(await messageTexts(writer), [...before, ...missed]);
    assert.equal(await stateOf(reader), "reconnecting", "the messages were published while the reader was away");
    assert.deepEqual(await messageTexts(reader), before);

    // Let the reconnect timer fire: the balancer finds node A gone and
    // hands the connection to node B, where the room resumes.
    await reader.clock.resume();
    await waitForState(reader, "connected", 20_000);
    assert.equal(await reader.getAttribute("#status", "data-node"), nodeB, "the reader is now on node B");

    const expected = [...before, ...missed];
    await waitFor(async () => (await messageTexts(reader)).length >= expected.length, { timeout: 15_000, what: "the missed messages at the reader" });
    // Late duplicates would come right behind the replay.
    await reader.waitForTimeout(500);
    assert.deepEqual(await messageTexts(reader), expected, "every missed message, once, in order");

    // Live delivery goes on after the resume.
    await send(writer, "after");
    await waitFor(async () => (await messageTexts(reader)).length === expected.length + 1, { what: "a live message after the resume" });
    assert.deepEqual(await messageTexts(reader), [...expected, "after"]);

    // Nothing was lost, so the page did not warn about a gap.
    assert.deepEqual(await reader.locator("#messages .notice").allTextContents(), []);
    assert.deepEqual(reader.dialogs, []);
    assert.deepEqual(reader.problems, []);
    assert.deepEqual(writer.problems, []);
  });
});
