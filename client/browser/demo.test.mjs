// The demo as the README runs it: Caddyfile.example (in-process broker,
// guest names, presence), two people in Chromium. It is what
// docs/screenshot.png shows (CADDYCHAT_UPDATE_SCREENSHOT=1 retakes it).
// See README.md.

import assert from "node:assert/strict";
import { copyFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import { artifact, launchBrowser, messageTexts, newChatPage, send, startExample, waitFor, waitForMessage, waitForState } from "./cluster.mjs";

const TEST_TIMEOUT = 60_000;

describe("the demo (Caddyfile.example)", { timeout: 180_000 }, () => {
  let example;
  let browser;

  before(async () => {
    [example, browser] = await Promise.all([startExample(), launchBrowser()]);
  });

  after(async () => {
    await browser?.close().catch(() => {});
    await example?.stop();
  });

  // A page of its own browser context (another person), recording every
  // answer with a 4xx or 5xx status and every request that failed.
  async function person(viewport) {
    const page = await newChatPage(browser, { viewport });
    page.httpErrors = [];
    page.on("response", (res) => {
      if (res.status() >= 400) page.httpErrors.push(`${res.status()} ${res.url()}`);
    });
    page.on("requestfailed", (req) => {
      // A WebSocket closed by a reload is not a failure of the page.
      if (req.resourceType() !== "websocket") page.httpErrors.push(`failed ${req.url()}: ${req.failure()?.errorText}`);
    });
    return page;
  }

  async function named(page, name) {
    await page.goto(`${example.url}/`);
    await waitForState(page, "connected");
    await waitFor(() => page.isVisible("#name-form"), { what: "the name field" });
    await page.fill("#name", name);
    await page.click("#name-apply");
    await waitFor(async () => (await page.textContent("#whoami")) === `· ${name} (guest)`, { what: `${name}'s name` });
    await waitForState(page, "connected");
  }

  // The presence list: "alice (guest, you)", "bob (guest)".
  function online(page) {
    return page.$$eval("#online li", (items) =>
      items.map((li) => {
        const badge = li.querySelector(".guest-badge");
        const name = badge ? li.firstChild.textContent : li.textContent;
        const tags = [badge ? "guest" : "user", li.classList.contains("me") ? "you" : ""].filter(Boolean);
        return `${name} (${tags.join(", ")})`;
      }),
    );
  }

  // The messages: "alice: text [right]" for own ones.
  function conversation(page) {
    return page.$$eval("#messages .message", (els) =>
      els.map((el) => `${el.querySelector(".from").textContent}${el.querySelector(".guest-badge") ? "~" : ""}: ${el.querySelector(".text").textContent}${el.classList.contains("mine") ? " [right]" : ""}`),
    );
  }

  test("the run command: two names, who is online, own messages on the right after a reload, no 404", { timeout: TEST_TIMEOUT }, async () => {
    const alice = await person({ width: 1000, height: 640 });
    const bob = await person({ width: 1000, height: 640 });
    await named(alice, "alice");
    await named(bob, "bob");

    for (const [page, me] of [[alice, "alice"], [bob, "bob"]]) {
      await waitFor(async () => (await alice.locator("#online li").count()) === 2 && (await bob.locator("#online li").count()) === 2, { what: "both online" });
      const want = ["alice (guest)", "bob (guest)"].map((s) => (s.startsWith(me) ? s.replace(")", ", you)") : s));
      assert.deepEqual(await online(page), want);
      assert.equal(await page.textContent("#online-count"), "2");
      assert.match(await page.textContent(".side h2"), /^Online\s+2$/);
      assert.equal(await page.isVisible("#presence-note"), false);
    }

    const lines = [
      [alice, "Morning! Is the 2.4 deploy done?"],
      [bob, "Yes, live since 9:00."],
      [alice, "Great. I reloaded my tab a minute ago: everything is still here."],
      [bob, "Same here: the room's history came back in order."],
      [alice, "Perfect, thanks!"],
    ];
    for (const [page, text] of lines) {
      await send(page, text);
      // Each waits for the other to see it: the order is the conversation's.
      await waitForMessage(alice, text);
      await waitForMessage(bob, text);
    }
    const mark = (who) => lines.map(([page, text]) => `${page === alice ? "alice" : "bob"}~: ${text}${page === who ? " [right]" : ""}`);
    assert.deepEqual(await conversation(alice), mark(alice));
    assert.deepEqual(await conversation(bob), mark(bob));

    // A reload: a new connection (a new guest id), the same tab.
    await alice.reload();
    await waitForState(alice, "connected");
    await waitFor(async () => (await messageTexts(alice)).length === lines.length, { what: "the room's history after the reload" });
    assert.deepEqual(await conversation(alice), mark(alice), "own messages stay on the right after a reload");
    assert.equal(await alice.inputValue("#name"), "alice", "the name is kept in the tab");
    await waitFor(async () => JSON.stringify(await online(bob)) === JSON.stringify(["alice (guest)", "bob (guest, you)"]), { what: "alice back in bob's list, once" });
    assert.deepEqual(await online(alice), ["alice (guest, you)", "bob (guest)"]);

    await alice.focus("#text");
    const shot = artifact("demo.png");
    await alice.screenshot({ path: shot });
    if (process.env.CADDYCHAT_UPDATE_SCREENSHOT === "1") {
      copyFileSync(shot, new URL("../../docs/screenshot.png", import.meta.url).pathname);
    }

    for (const page of [alice, bob]) {
      assert.deepEqual(page.httpErrors, [], "no request answered 404 (or any error), the favicon included");
      assert.deepEqual(page.problems, [], "no page error or CSP violation");
    }
    // The favicon is the page's own (a data: URL): nothing asks the site for one.
    assert.match(await alice.getAttribute('link[rel="icon"]', "href"), /^data:image\/svg\+xml,/);
    await Promise.all([alice.context().close(), bob.context().close()]);
  });

  test("a message that arrives before the ok of its publish is shown once", { timeout: TEST_TIMEOUT }, async () => {
    for (const hide of [false, true]) await messageBeforeOk(hide);
  });

  async function messageBeforeOk(hideGuest) {
    const page = await person({ width: 1000, height: 640 });
    // Between the page and the node: the ok of each publish is held until
    // the message it acknowledges has been delivered and shown, so the
    // message always beats its ok. With hideGuest the welcome's guest id is
    // removed too, so the page can learn the message is its own only from
    // the ok (as on a route without guest_names).
    const held = [];
    await page.routeWebSocket(/\/ws(\?.*)?$/, (ws) => {
      const server = ws.connectToServer();
      server.onMessage((data) => {
        const frame = JSON.parse(data);
        if (frame.type === "welcome" && hideGuest) {
          delete frame.guest;
          return ws.send(JSON.stringify(frame));
        }
        if (frame.type === "ok" && frame.message_id) return held.push({ frame, release: () => ws.send(data) });
        ws.send(data);
      });
    });
    const room = `order-${Date.now().toString(36)}`;
    const shownOnce = async (text, { mine }) => {
      await waitForMessage(page, text);
      await page.waitForTimeout(200); // time for a second copy, if the page made one
      const els = page.locator("#messages .message").filter({ has: page.locator(".text", { hasText: text }) });
      assert.equal(await els.count(), 1, `${text}: shown once`);
      assert.equal(await els.first().evaluate((el) => el.classList.contains("mine")), mine, `${text}: on the ${mine ? "right" : "left"}`);
      return els.first();
    };
    const releaseOk = async () => {
      await waitFor(() => held.length === 1, { what: "the held ok" });
      held.shift().release();
    };

    await page.goto(`${example.url}/ws#${room}`);
    await waitForState(page, "connected");
    const text = hideGuest ? "known as mine from the ok only" : "known as mine from the guest id";
    await send(page, text);
    // Shown before its ok: on the right at once when the page knows its
    // guest id, on the left until the ok otherwise.
    const el = await shownOnce(text, { mine: !hideGuest });
    assert.equal(held.length, 1, "its ok is still held");
    await releaseOk();
    await waitFor(() => el.evaluate((e) => e.classList.contains("mine")), { what: "the message on the right after its ok" });
    await shownOnce(text, { mine: true });
    assert.deepEqual(page.problems, []);
    assert.deepEqual(page.httpErrors, []);
    await page.context().close();
  }
});
