// The chat page's typing indicator (ephemeral publishes) and user names
// (user_info_claim name on /team), with two signed-in pages on two Caddy
// nodes sharing one redis-server. See README.md.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { messageTexts, mintToken, newChatPage, send, startAll, stopAll, waitFor, waitForMessage, waitForState } from "./cluster.mjs";

describe("typing and names", { timeout: 120_000 }, () => {
  let env;
  let cluster;
  let browser;

  before(async () => {
    env = await startAll({ nodes: ["a", "b"] });
    ({ cluster, browser } = env);
    if (env.error) throw env.error;
  });

  after(() => stopAll(env));

  async function signedIn(node, room, user, name) {
    const page = await newChatPage(browser);
    await page.context().addInitScript((token) => sessionStorage.setItem("caddychat.token", token), mintToken(user, 3600, { name }));
    await page.goto(`${node.url}/team#${room}`);
    await waitForState(page, "connected");
    return page;
  }

  test("one page types, the other sees who, by name; never kept, never shown to the typist", { timeout: 90_000 }, async () => {
    const room = `typing-${Date.now().toString(36)}`;
    const { a, b } = cluster.nodes;
    const alice = await signedIn(a, room, "alice", "Alice Liddell");
    const bob = await signedIn(b, room, "bob", "Bob Builder");

    // The member list shows the names of the users' info, on both nodes.
    const online = (page) => page.locator("#online li").allTextContents();
    for (const page of [alice, bob]) {
      await waitFor(async () => (await online(page)).join() === "Alice Liddell,Bob Builder", { what: "names in the member list" });
    }
    assert.equal(await bob.getAttribute('#online li[data-user="alice"]', "title"), "alice", "the user id is the name's title");

    // Alice types: bob sees it within a moment, alice does not.
    await alice.fill("#text", "hel");
    await waitFor(async () => (await bob.textContent("#typing")) === "Alice Liddell is typing…", { what: "bob sees alice typing" });
    assert.equal(await alice.textContent("#typing"), "", "the typist is not told it is typing");

    // Without more typing it goes away after about 4 s.
    const shown = Date.now();
    await waitFor(async () => (await bob.textContent("#typing")) === "", { timeout: 10_000, what: "the typing indicator to expire" });
    const lasted = Date.now() - shown;
    assert.ok(lasted > 2000, `the indicator stayed ${lasted} ms, want about 4 s`);

    // Typing again, then sending: the message replaces the indicator at once,
    // and it shows the sender's name.
    await alice.fill("#text", "hello bo");
    await waitFor(async () => (await bob.textContent("#typing")) !== "", { what: "bob sees alice typing again" });
    await send(alice, "hello bob");
    const msg = await waitForMessage(bob, "hello bob");
    assert.equal(await msg.locator(".from").textContent(), "Alice Liddell");
    assert.equal(await msg.locator(".from").getAttribute("title"), "alice");
    assert.equal(await bob.textContent("#typing"), "", "a message from the typist ends its indicator");

    // Typing events are never kept: a reload shows the message only.
    await bob.reload();
    await waitForState(bob, "connected");
    await waitForMessage(bob, "hello bob");
    assert.deepEqual(await messageTexts(bob), ["hello bob"]);

    for (const page of [alice, bob]) assert.deepEqual(page.problems, [], "no page error or CSP violation");
  });
});
