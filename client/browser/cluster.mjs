// cluster.mjs: what the browser tests run against, started from scratch by
// each test file and killed by its after hook: a redis-server on a free
// loopback port, Caddy nodes built with the chat module (the binary in
// $CADDYCHAT_CADDY), an optional load-balancing Caddy in front of them, and
// Debian's Chromium driven by playwright-core.
//
// Every child process is also killed when this process exits, so a failing
// or interrupted run leaves nothing behind.

import { spawn } from "node:child_process";
import { X509Certificate, createHash, createHmac, randomBytes } from "node:crypto";
import { accessSync, constants, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import https from "node:https";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

export const CHROMIUM = process.env.CADDYCHAT_CHROMIUM || "/usr/bin/chromium";
export const REDIS_SERVER = process.env.CADDYCHAT_REDIS_SERVER || "/usr/bin/redis-server";
export const ARTIFACTS = new URL("./artifacts/", import.meta.url).pathname;

// The secret of the routes with a jwt block; tokens are minted with mintToken.
const JWT_SECRET = randomBytes(32).toString("hex");

const children = new Set();

function killAll() {
  for (const child of children) {
    try {
      child.kill("SIGKILL");
    } catch {
      // Already gone.
    }
  }
}
process.on("exit", killAll);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(signal, () => {
    killAll();
    process.exit(128 + os.constants.signals[signal]);
  });
}

/** The Caddy binary with the chat module, from $CADDYCHAT_CADDY; throws a clear message when unset. */
export function caddyBinary() {
  const bin = process.env.CADDYCHAT_CADDY;
  if (!bin) {
    throw new Error(
      "CADDYCHAT_CADDY is not set: the browser tests need a Caddy binary with the chat module.\n" +
        "Build one and point at it:  go build -o /tmp/caddy ./cmd/caddy && CADDYCHAT_CADDY=/tmp/caddy node --test client/browser/\n" +
        "(make test does both)",
    );
  }
  try {
    accessSync(bin, constants.X_OK);
  } catch {
    throw new Error(`CADDYCHAT_CADDY=${bin} is not an executable file`);
  }
  return path.resolve(bin);
}

/** A port nobody listens on right now (listen on :0, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/**
 * Polls fn (sync or async) until it returns a truthy value, or throws after
 * timeout ms with what. An error fn throws counts as "not yet", unless it is marked fatal.
 */
export async function waitFor(fn, { timeout = 10_000, interval = 50, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const value = await fn();
      if (value) return value;
    } catch (err) {
      if (err?.fatal) throw err;
      last = err;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${last ? `: ${last.message}` : ""}`);
    }
    await sleep(interval);
  }
}

function tail(file, lines = 40) {
  try {
    return readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

/** A child process whose output goes to a log file in dir. */
class Proc {
  constructor(name, cmd, args, { dir, env, cwd = dir }) {
    this.name = name;
    this.log = path.join(dir, `${name}.log`);
    const fd = openSync(this.log, "a");
    this.child = spawn(cmd, args, { cwd, env, stdio: ["ignore", fd, fd] });
    closeSync(fd);
    children.add(this.child);
    this.exited = new Promise((resolve) => {
      this.child.once("exit", (code, signal) => {
        children.delete(this.child);
        resolve({ code, signal });
      });
      this.child.once("error", (err) => {
        children.delete(this.child);
        resolve({ code: null, signal: null, error: err });
      });
    });
    this.exitStatus = null;
    this.exited.then((s) => (this.exitStatus = s));
  }

  get running() {
    return this.exitStatus === null;
  }

  /** Waits until ready() is true; fails early with the log if the process exits. */
  async ready(ready, timeout = 15_000) {
    try {
      await waitFor(async () => {
        if (!this.running) {
          const { code, signal, error } = this.exitStatus;
          throw Object.assign(new Error(`${this.name} exited (${error?.message ?? (signal || `code ${code}`)}) before it was ready`), { fatal: true });
        }
        return ready();
      }, { timeout, interval: 50, what: `${this.name} to be ready` });
    } catch (err) {
      err.message += `\n--- ${this.log} ---\n${tail(this.log)}`;
      throw err;
    }
  }

  async kill(signal = "SIGKILL") {
    if (this.running) this.child.kill(signal);
    await this.exited;
  }
}

function tcpReady(port, probe, expect) {
  return new Promise((resolve) => {
    const sock = net.connect(port, "127.0.0.1");
    let got = "";
    const done = (ok) => {
      sock.destroy();
      resolve(ok);
    };
    sock.setTimeout(1000, () => done(false));
    sock.on("error", () => done(false));
    sock.on("connect", () => (probe ? sock.write(probe) : done(true)));
    sock.on("data", (d) => {
      got += d;
      if (got.includes(expect)) done(true);
    });
  });
}

/** GET url over https trusting only the PEM root(s) in ca. */
function httpsOK(url, ca) {
  return new Promise((resolve) => {
    const req = https.get(url, { ca, timeout: 2000 }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode >= 200 && res.statusCode < 300));
    });
    req.on("error", () => resolve(false));
    req.on("timeout", () => req.destroy());
  });
}

async function httpOK(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
    await res.arrayBuffer();
    return res.ok;
  } catch {
    return false;
  }
}

/**
 * Starts redis-server and the Caddy nodes named in `nodes` (e.g. ["a", "b"]),
 * each serving:
 *   /ws    anonymous chat route with ui, history on room:**, no rate limit;
 *   /team  the same behind a jwt block (tokens from mintToken; the name claim is
 *          the user's info), with presence on.
 * With lb: true, also a Caddy in front (lb_policy first, passive health checks).
 * With tls: true, the nodes serve https:// and wss:// with certificates of
 * their own local CAs (`tls internal`, never installed into a trust store);
 * each node's `ca` holds its root and intermediate (see spkiHashes).
 */
export async function startCluster({ nodes = ["a", "b"], lb = false, tls = false } = {}) {
  const bin = caddyBinary();
  const dir = mkdtempSync(path.join(os.tmpdir(), "caddychat-browser-"));
  const home = path.join(dir, "home");
  const env = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: home,
    XDG_CONFIG_HOME: path.join(home, ".config"),
    XDG_DATA_HOME: path.join(home, ".local/share"),
    XDG_CACHE_HOME: path.join(home, ".cache"),
    CHAT_JWT_SECRET: JWT_SECRET,
  };
  const cluster = { dir, procs: [], nodes: {}, lb: null };

  cluster.stop = async () => {
    await Promise.all(cluster.procs.map((p) => p.kill("SIGKILL")));
    if (process.env.CADDYCHAT_KEEP_TMP === "1") console.log(`# kept ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  };

  try {
    for (const d of [".config", ".local/share", ".cache"]) mkdirSync(path.join(home, d), { recursive: true });
    const redisPort = await freePort();
    const startRedis = async () => {
      const redis = new Proc("redis", REDIS_SERVER, [
        "--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", dir, "--protected-mode", "yes", "--loglevel", "warning",
      ], { dir, env });
      cluster.procs.push(redis);
      cluster.redis = redis;
      await redis.ready(() => tcpReady(redisPort, "PING\r\n", "+PONG"));
    };
    await startRedis();
    cluster.redisPort = redisPort;
    // Kills redis-server (SIGKILL: no persistence, its data is gone) and
    // starts it again on the same port; resolves once it answers PING.
    cluster.restartRedis = async ({ down = 0 } = {}) => {
      await cluster.redis.kill("SIGKILL");
      if (down > 0) await new Promise((r) => setTimeout(r, down));
      await startRedis();
    };

    const redisURL = `redis://127.0.0.1:${redisPort}/0`;
    const chatBlock = (extra) => `{
		redis ${redisURL}
		ui on
		history room:** 500 1h
		rate_limit off${extra}
	}`;
    const routes = `	chat /ws ${chatBlock("")}
	chat /team ${chatBlock(`
		jwt {
			secret {env.CHAT_JWT_SECRET}
			user_info_claim name
		}
		subscribe room:**
		publish room:**
		presence on`)}
`;
    await Promise.all(nodes.map(async (name) => {
      cluster.nodes[name] = await startCaddy(cluster, name, routes, env, { tls });
    }));

    if (lb) {
      const upstreams = nodes.map((n) => `127.0.0.1:${cluster.nodes[n].port}`).join(" ");
      // lb_policy first: every connection goes to the first node while it
      // answers. A refused dial marks it down for fail_duration and the
      // request is retried on the next one within lb_try_duration.
      const site = `	reverse_proxy ${upstreams} {
		lb_policy first
		lb_try_duration 5s
		lb_try_interval 100ms
		fail_duration 5s
		max_fails 1
	}
`;
      cluster.lb = await startCaddy(cluster, "lb", site, env);
    }
    return cluster;
  } catch (err) {
    await cluster.stop();
    throw err;
  }
}

async function startCaddy(cluster, name, site, env, { tls = false } = {}) {
  const [port, admin] = [await freePort(), await freePort()];
  const storage = path.join(cluster.dir, `storage-${name}`);
  // With tls: Caddy's local CA issues the site's certificate; the root is
  // not installed anywhere (skip_install_trust) and no HTTP->HTTPS
  // redirect server binds port 80.
  const global = tls
    ? `skip_install_trust
	auto_https disable_redirects
	http_port ${await freePort()}`
    : "auto_https off";
  const caddyfile = `{
	admin 127.0.0.1:${admin}
	persist_config off
	${global}
	storage file_system ${storage}
}

${tls ? "https" : "http"}://127.0.0.1:${port} {
${tls ? "\ttls internal\n" : ""}${site}}
`;
  const file = path.join(cluster.dir, `Caddyfile.${name}`);
  writeFileSync(file, caddyfile);
  const proc = new Proc(`caddy-${name}`, caddyBinary(), ["run", "--config", file, "--adapter", "caddyfile"], { dir: cluster.dir, env });
  cluster.procs.push(proc);
  if (tls) {
    const url = `https://127.0.0.1:${port}`;
    const authority = path.join(storage, "pki", "authorities", "local");
    const read = (f) => readFileSync(path.join(authority, f), "utf8");
    let ca;
    await proc.ready(async () => {
      ca ??= { root: read("root.crt"), intermediate: read("intermediate.crt") };
      return httpsOK(`${url}/ws/caddychat.js`, ca.root);
    });
    return { name, port, url, proc, caddyfile: file, ca };
  }
  const url = `http://127.0.0.1:${port}`;
  // The client library is served by the chat route: the node is up and the module loaded.
  await proc.ready(() => httpOK(`${url}/ws/caddychat.js`));
  return { name, port, url, proc, caddyfile: file };
}

/**
 * Runs the repository's Caddyfile.example as the README's run command does
 * (`caddy run --config Caddyfile.example`, from the repository root, so its
 * relative paths hold), on a free loopback port (CHAT_ADDR) with its admin
 * endpoint on another (CADDY_ADMIN). Returns {url, proc, stop}.
 */
export async function startExample() {
  const bin = caddyBinary();
  const dir = mkdtempSync(path.join(os.tmpdir(), "caddychat-example-"));
  const home = path.join(dir, "home");
  for (const d of [".config", ".local/share", ".cache"]) mkdirSync(path.join(home, d), { recursive: true });
  const [port, admin] = [await freePort(), await freePort()];
  const env = {
    PATH: process.env.PATH ?? "/usr/bin:/bin",
    HOME: home,
    XDG_CONFIG_HOME: path.join(home, ".config"),
    XDG_DATA_HOME: path.join(home, ".local/share"),
    XDG_CACHE_HOME: path.join(home, ".cache"),
    CHAT_ADDR: `127.0.0.1:${port}`,
    CADDY_ADMIN: `127.0.0.1:${admin}`,
  };
  const root = new URL("../../", import.meta.url).pathname;
  const proc = new Proc("caddy-example", bin, ["run", "--config", "Caddyfile.example", "--adapter", "caddyfile"], { dir, env, cwd: root });
  const stop = async () => {
    await proc.kill("SIGKILL");
    if (process.env.CADDYCHAT_KEEP_TMP === "1") console.log(`# kept ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  };
  const url = `http://127.0.0.1:${port}`;
  try {
    await proc.ready(() => httpOK(`${url}/ws/caddychat.js`));
  } catch (err) {
    await stop();
    throw err;
  }
  return { url, proc, stop };
}

/**
 * The SPKI hashes (base64 SHA-256 of the DER SubjectPublicKeyInfo) of the
 * nodes' local CA intermediates, for Chromium's
 * --ignore-certificate-errors-spki-list: Chromium then accepts a chain a
 * node presents when a certificate in it has one of these keys, and
 * rejects every other untrusted chain as usual. Chromium matches the
 * certificates the server sends (the leaf and Caddy's intermediate), not
 * the root it would chain to: with the root's hash alone the page fails
 * with ERR_CERT_AUTHORITY_INVALID (tried). Caddy renews the intermediate
 * (every 7 days by default), which is fine for a test run.
 */
export function spkiHashes(cluster) {
  return Object.values(cluster.nodes).map((node) => {
    const spki = new X509Certificate(node.ca.intermediate).publicKey.export({ type: "spki", format: "der" });
    return createHash("sha256").update(spki).digest("base64");
  });
}

/** An HS256 JWT for the /team routes, with extra claims (e.g. name: the user's info there). */
export function mintToken(sub, ttlSeconds = 3600, claims = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const unsigned = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ ...claims, sub, iat: now, exp: now + ttlSeconds })}`;
  const sig = createHmac("sha256", JWT_SECRET).update(unsigned).digest("base64url");
  return `${unsigned}.${sig}`;
}

/**
 * Starts the cluster and the browser side by side. Whatever started is
 * returned even when the other failed (then `error` is set), so that the
 * after hook can stop it.
 */
export async function startAll(clusterOptions) {
  if (clusterOptions?.tls) {
    // The browser trusts the nodes' CAs, which exist once the nodes run.
    let cluster;
    try {
      cluster = await startCluster(clusterOptions);
      const browser = await launchBrowser({ args: [`--ignore-certificate-errors-spki-list=${spkiHashes(cluster).join(",")}`] });
      return { cluster, browser };
    } catch (error) {
      return { cluster, error };
    }
  }
  const [cluster, browser] = await Promise.allSettled([startCluster(clusterOptions), launchBrowser()]);
  return {
    cluster: cluster.value,
    browser: browser.value,
    error: cluster.reason ?? browser.reason,
  };
}

/** Stops what startAll started. */
export async function stopAll({ cluster, browser } = {}) {
  await browser?.close().catch(() => {});
  await cluster?.stop();
}

/** Debian's Chromium, headless; never a browser downloaded by Playwright. */
export async function launchBrowser({ args = [] } = {}) {
  try {
    accessSync(CHROMIUM, constants.X_OK);
  } catch {
    throw new Error(`no Chromium at ${CHROMIUM}: apt-get install -y chromium (or set CADDYCHAT_CHROMIUM)`);
  }
  let chromium;
  try {
    ({ chromium } = await import("playwright-core"));
  } catch (err) {
    throw new Error(`playwright-core is not installed: run npm ci in client/browser (${err.message})`);
  }
  return chromium.launch({ executablePath: CHROMIUM, headless: true, timeout: 30_000, args });
}

/**
 * A new browser context (its own storage, like another person's browser) and
 * page. Uncaught page errors and Content-Security-Policy violations are
 * collected in page.problems; dialogs in page.dialogs (and dismissed).
 */
export async function newChatPage(browser, { viewport = { width: 1000, height: 640 }, clock = false } = {}) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.setDefaultTimeout(15_000);
  page.problems = [];
  page.dialogs = [];
  page.on("pageerror", (err) => page.problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error" && /Content.Security.Policy|Refused to/i.test(msg.text())) page.problems.push(`console: ${msg.text()}`);
  });
  page.on("dialog", (dialog) => {
    page.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
  if (clock) await page.clock.install();
  return page;
}

/** The page's connection state (#status data-state). */
export function stateOf(page) {
  return page.locator("#status").getAttribute("data-state");
}

export async function waitForState(page, state, timeout = 15_000) {
  await waitFor(async () => (await stateOf(page)) === state, { timeout, what: `#status data-state=${state}` });
}

/** The texts of the page's messages, in order. */
export function messageTexts(page) {
  return page.locator("#messages .message .text").allTextContents();
}

/** Types text into the message box and sends it. */
export async function send(page, text) {
  await page.fill("#text", text);
  await page.click("#send");
}

/** Waits until a message with exactly this text is shown; returns its locator. */
export async function waitForMessage(page, text, timeout = 15_000) {
  await waitFor(async () => (await messageTexts(page)).includes(text), { timeout, what: `message ${JSON.stringify(text)}` });
  return page.locator("#messages .message").filter({ has: page.locator(".text", { hasText: text }) }).last();
}

export function artifact(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return path.join(ARTIFACTS, name);
}
