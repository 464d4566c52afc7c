// The chat page (client/ui) in headless Chromium against two real Caddy
// nodes sharing one redis-server: messages across nodes, text that looks
// like markup, tokens and presence, and screenshots. See README.md.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  artifact,
  messageTexts,
  mintToken,
  newChatPage,
  send,
  startAll,
  stateOf,
  stopAll,
  waitFor,
  waitForMessage,
  waitForState,
} from "./cluster.mjs";

const TEST_TIMEOUT = 60_000;
const uniqueRoom = (prefix) => `${prefix}-${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;

describe("chat page", { timeout: 180_000 }, () => {
  let env;
  let cluster;
  let browser;
  const pages = [];

  before(async () => {
    env = await startAll({ nodes: ["a", "b"] });
    ({ cluster, browser } = env);
    if (env.error) throw env.error;
  });

  after(() => stopAll(env));

  async function open(url, options) {
    const page = await newChatPage(browser, options);
    pages.push(page);
    await page.goto(url);
    return page;
  }

  function assertClean(...list) {
    for (const page of list) {
      assert.deepEqual(page.dialogs, [], "no dialog may open");
      assert.deepEqual(page.problems, [], "no page error or CSP violation");
    }
  }

  test("two pages on two nodes talk in one room, both ways", { timeout: TEST_TIMEOUT }, async () => {
    const room = uniqueRoom("nodes");
    const { a, b } = cluster.nodes;

    // Page 1 joins with the room field, page 2 with a link to the room.
    const p1 = await open(`${a.url}/ws`);
    await waitForState(p1, "connected");
    assert.equal(await p1.textContent("#room-title"), "#lobby", "the default room is lobby");
    await p1.fill("#room", room);
    await p1.click("#join");
    await waitFor(async () => (await p1.textContent("#room-title")) === `#${room}`, { what: "page 1 in the room" });

    const p2 = await open(`${b.url}/ws#${room}`);
    await waitForState(p2, "connected");
    assert.equal(await p2.textContent("#room-title"), `#${room}`);
    assert.equal(await p2.inputValue("#room"), room);

    const node1 = await p1.getAttribute("#status", "data-node");
    const node2 = await p2.getAttribute("#status", "data-node");
    assert.ok(node1 && node2 && node1 !== node2, `the pages are on different nodes (${node1}, ${node2})`);

    await send(p1, "hello from node A");
    const seenBy2 = await waitForMessage(p2, "hello from node A");
    await send(p2, "and hello back from node B");
    const seenBy1 = await waitForMessage(p1, "and hello back from node B");

    for (const msg of [seenBy1, seenBy2]) {
      assert.equal(await msg.locator(".from").textContent(), "anonymous");
      const time = msg.locator(".time");
      assert.match(await time.textContent(), /\d{1,2}[:.]\d{2}/, "a time is shown");
      const when = Date.parse(await time.getAttribute("datetime"));
      assert.ok(Math.abs(Date.now() - when) < 60_000, "the time is the publish time");
    }
    // Each page marks its own messages, not the other's.
    assert.equal(await (await waitForMessage(p1, "hello from node A")).getAttribute("class"), "message mine");
    assert.equal(await seenBy2.getAttribute("class"), "message");

    // Both pages show the whole conversation, in order, once.
    for (const page of [p1, p2]) {
      await waitFor(async () => (await messageTexts(page)).length === 2, { what: "two messages" });
      assert.deepEqual(await messageTexts(page), ["hello from node A", "and hello back from node B"]);
    }

    // The anonymous route has no presence: the page says so.
    await waitFor(() => p1.isVisible("#presence-note"), { what: "the presence note" });
    assert.match(await p1.textContent("#presence-note"), /presence is off/i);
    assert.equal(await p1.locator("#online li").count(), 0);

    // Joining another room shows that room's history only.
    const other = uniqueRoom("other");
    await p1.fill("#room", other);
    await p1.click("#join");
    await waitFor(async () => (await p1.textContent("#room-title")) === `#${other}`, { what: "page 1 in the other room" });
    await p1.waitForTimeout(300);
    assert.deepEqual(await messageTexts(p1), []);
    await p1.click(`#rooms button[data-room="${room}"]`);
    await waitFor(async () => (await messageTexts(p1)).length === 2, { what: "the first room's history back" });
    assert.deepEqual(await messageTexts(p1), ["hello from node A", "and hello back from node B"]);

    assertClean(p1, p2);
  });

  test("message text that looks like markup is shown as text, never run", { timeout: TEST_TIMEOUT }, async () => {
    const room = uniqueRoom("xss");
    const { a, b } = cluster.nodes;
    const p1 = await open(`${a.url}/ws#${room}`);
    const p2 = await open(`${b.url}/ws#${room}`);
    await Promise.all([waitForState(p1, "connected"), waitForState(p2, "connected")]);

    const img = "<img src=x onerror=alert(1)>";
    const script = "<script>alert(2)</script>";
    const both = `<b>bold?</b> ${img} ${script}`;
    // Each sender waits for its own copy (published) before another one
    // sends: publishes on two nodes have no order between them otherwise.
    await send(p1, img);
    await send(p1, script);
    await waitForMessage(p1, script);
    await send(p2, both);
    await waitForMessage(p2, both);

    // Data that is not {text: string} is shown as its JSON, as text too.
    const objectData = { html: "<img src=y onerror=alert(3)>", n: 1 };
    await p2.evaluate(
      ({ room, data }) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(`ws://${location.host}/ws`, ["caddychat"]);
          ws.onerror = () => reject(new Error("websocket failed"));
          ws.onopen = () => ws.send(JSON.stringify({ op: "publish", channel: `room:${room}`, data, id: 1 }));
          ws.onmessage = (e) => {
            const frame = JSON.parse(e.data);
            if (frame.id === 1) {
              ws.close();
              frame.type === "ok" ? resolve() : reject(new Error(e.data));
            }
          };
        }),
      { room, data: objectData },
    );

    const expected = [img, script, both, JSON.stringify(objectData)];
    for (const page of [p1, p2]) {
      await waitFor(async () => (await messageTexts(page)).length === expected.length, { what: "four messages" });
      assert.deepEqual(await messageTexts(page), expected);
      assert.equal(await page.locator("#messages img").count(), 0, "no img element in #messages");
      assert.equal(await page.locator("#messages script, #messages b").count(), 0, "no element made from message text");
    }
    // An onerror handler would have run by now.
    await p1.waitForTimeout(500);
    assertClean(p1, p2);
  });

  test("signed-in users: the token field, presence across nodes, join and leave", { timeout: TEST_TIMEOUT }, async () => {
    const room = uniqueRoom("team");
    const { a, b } = cluster.nodes;

    // Without a token the jwt route refuses the upgrade: the page keeps
    // trying and opens the token panel.
    const alice = await open(`${a.url}/team#${room}`);
    await waitFor(() => alice.evaluate(() => document.getElementById("auth").open), { what: "the token panel to open" });
    assert.equal(await stateOf(alice), "connecting");
    await waitFor(async () => /token/i.test((await alice.locator("#messages .notice").allTextContents()).join()), { what: "the hint to enter a token" });

    await alice.fill("#token", mintToken("alice"));
    await alice.click("#token-apply");
    await waitForState(alice, "connected");
    await waitFor(async () => (await alice.textContent("#whoami")) === "· alice", { what: "alice signed in" });
    assert.equal(await alice.evaluate(() => sessionStorage.getItem("caddychat.token")), await alice.inputValue("#token"));

    // Bob's tab already holds a token (sessionStorage) and is on the other node.
    const bob = await newChatPage(browser);
    pages.push(bob);
    await bob.context().addInitScript((token) => sessionStorage.setItem("caddychat.token", token), mintToken("bob"));
    await bob.goto(`${b.url}/team#${room}`);
    await waitForState(bob, "connected");

    const online = (page) => page.locator("#online li").allTextContents();
    for (const page of [alice, bob]) {
      await waitFor(async () => (await online(page)).join() === "alice,bob", { what: "alice and bob online" });
      assert.equal(await page.isVisible("#presence-note"), false);
      assert.equal(await page.textContent("#online-count"), "2");
    }
    assert.equal(await alice.getAttribute('#online li[data-user="alice"]', "class"), "me");

    await send(bob, "hi alice");
    const msg = await waitForMessage(alice, "hi alice");
    assert.equal(await msg.locator(".from").textContent(), "bob");

    // A reload keeps the token (this tab's sessionStorage) and the room.
    await alice.reload();
    await waitForState(alice, "connected");
    await waitFor(async () => (await alice.textContent("#whoami")) === "· alice", { what: "alice still signed in" });
    assert.ok((await alice.inputValue("#token")).length > 20, "the token field is filled from sessionStorage");
    await waitForMessage(alice, "hi alice");

    // Bob leaves: alice sees it.
    await bob.close();
    await waitFor(async () => (await online(alice)).join() === "alice", { what: "bob's leave" });

    assertClean(alice);
  });

  test("screenshots of a short conversation, desktop and phone", { timeout: TEST_TIMEOUT }, async () => {
    const { a, b } = cluster.nodes;
    const withToken = async (url, user, viewport) => {
      const page = await newChatPage(browser, { viewport });
      pages.push(page);
      await page.context().addInitScript((token) => sessionStorage.setItem("caddychat.token", token), mintToken(user));
      await page.goto(url);
      await waitForState(page, "connected");
      return page;
    };
    const alice = await withToken(`${a.url}/team#lobby`, "alice", { width: 1000, height: 640 });
    const bob = await withToken(`${b.url}/team#lobby`, "bob", { width: 390, height: 844 });

    const lines = [
      [alice, "Morning! Is the 2.4 deploy done?"],
      [bob, "Yes, live on both nodes since 9:00."],
      [alice, "Great. I restarted node A a minute ago, did you notice anything?"],
      [bob, "Nothing: my tab reconnected to node B and caught up without a gap."],
      [alice, "Perfect, thanks!"],
    ];
    for (const [page, text] of lines) {
      await send(page, text);
      await Promise.all([waitForMessage(alice, text), waitForMessage(bob, text)]);
    }
    for (const page of [alice, bob]) {
      await waitFor(async () => (await page.locator("#online li").allTextContents()).join() === "alice,bob", { what: "both online" });
    }
    await alice.focus("#text");

    const desktop = artifact("chat.png");
    await alice.screenshot({ path: desktop });
    await bob.screenshot({ path: artifact("chat-mobile.png") });

    // The phone layout: nothing wider than the screen; the box and button in view.
    assert.ok(await bob.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth), "no horizontal scrolling on a phone");
    for (const sel of ["#text", "#send", "#status"]) {
      const box = await bob.locator(sel).boundingBox();
      assert.ok(box && box.x >= 0 && box.x + box.width <= 390 && box.y + box.height <= 844, `${sel} is on the phone screen`);
    }
    assert.ok((await bob.locator("#messages").boundingBox()).height > 300, "the messages get most of the phone screen");

    // docs/screenshot.png is the demo's (demo.test.mjs), not this one.
    assertClean(alice, bob);
  });
});
