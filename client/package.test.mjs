// The npm package: `npm pack` of client/ into a temporary directory, the
// tarball installed in a fresh project (offline: the package has no
// dependencies), and `caddychat` imported from there, as an app would.
// node --test client/package.test.mjs (make jstest)

import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const clientDir = fileURLToPath(new URL(".", import.meta.url));
const npm = process.platform === "win32" ? "npm.cmd" : "npm";
const quiet = { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] };

test("npm pack of client/ installs in a fresh project and imports as caddychat, with its types", async (t) => {
  const tmp = mkdtempSync(join(tmpdir(), "caddychat-pack-"));
  t.after(() => rmSync(tmp, { recursive: true, force: true }));
  const meta = JSON.parse(readFileSync(join(clientDir, "package.json"), "utf8"));
  assert.equal(meta.name, "caddychat");
  assert.equal(meta.type, "module");

  // Pack: only the module, its types, the README and package.json.
  const packDir = join(tmp, "pack");
  mkdirSync(packDir);
  const [packed] = JSON.parse(execFileSync(npm, ["pack", "--json", "--pack-destination", packDir], { ...quiet, cwd: clientDir }));
  assert.equal(packed.name, "caddychat");
  assert.equal(packed.version, meta.version);
  assert.deepEqual(packed.files.map((f) => f.path).sort(), ["README.md", "caddychat.d.ts", "caddychat.js", "package.json"]);
  const tarball = join(packDir, packed.filename);
  assert.ok(existsSync(tarball), `${tarball} was written`);

  // A fresh project installs the tarball, offline.
  const app = join(tmp, "app");
  mkdirSync(app);
  writeFileSync(join(app, "package.json"), JSON.stringify({ name: "app", private: true, type: "module" }));
  let how = "npm install";
  try {
    execFileSync(npm, ["install", tarball, "--offline", "--no-audit", "--no-fund", "--loglevel=error"], { ...quiet, cwd: app });
  } catch (err) {
    // An npm that wants the network even so: unpack it where npm would.
    how = `tar (npm install failed: ${String(err.stderr ?? err.message).trim().split("\n")[0]})`;
    const dest = join(app, "node_modules", "caddychat");
    mkdirSync(dest, { recursive: true });
    execFileSync("tar", ["-xzf", tarball, "-C", dest, "--strip-components=1"], quiet);
  }
  t.diagnostic(`installed with ${how}`);
  const installed = join(app, "node_modules", "caddychat");
  assert.deepEqual(JSON.parse(readFileSync(join(installed, "package.json"), "utf8")).version, meta.version);

  // The app imports it by name: the packed copy, not this checkout.
  writeFileSync(
    join(app, "main.js"),
    `import * as lib from "caddychat";
import { CaddyChat, TRANSPORTS } from "caddychat";
class Quiet { send() {} close() {} }
const chat = new CaddyChat("ws://127.0.0.1:9/never", { WebSocket: Quiet, setTimeout: () => 0, clearTimeout: () => {} });
const transport = chat.transport;
chat.close();
console.log(JSON.stringify({ resolved: import.meta.resolve("caddychat"), exports: Object.keys(lib).sort(), transports: TRANSPORTS, transport, state: chat.state }));
`,
  );
  const out = JSON.parse(execFileSync(process.execPath, ["main.js"], { ...quiet, cwd: app }));
  assert.equal(fileURLToPath(out.resolved), join(installed, "caddychat.js"));
  const here = await import("./caddychat.js");
  assert.deepEqual(out.exports, Object.keys(here).sort());
  assert.deepEqual(out.transports, ["websocket", "sse"]);
  assert.equal(out.transport, "websocket");
  assert.equal(out.state, "closed");

  // The types: the exports' "types" condition names a file that is in the package.
  const types = meta.exports["."].types;
  assert.equal(types, meta.types);
  assert.ok(existsSync(join(installed, types)), `${types} is in the package`);
  assert.equal(readFileSync(join(installed, types), "utf8"), readFileSync(join(clientDir, "caddychat.d.ts"), "utf8"));

  // And TypeScript (the typecheck's pinned copy, when installed: make
  // typecheck) resolves "caddychat" from the app to those types.
  const tsPath = join(clientDir, "typecheck", "node_modules", "typescript");
  if (!existsSync(tsPath)) {
    t.diagnostic("typescript not installed (make typecheck installs it): type resolution not checked");
    return;
  }
  const ts = createRequire(join(clientDir, "typecheck", "package.json"))("typescript");
  const options = { module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext };
  const { resolvedModule } = ts.resolveModuleName("caddychat", join(app, "main.ts"), options, ts.sys, undefined, undefined, ts.ModuleKind.ESNext);
  assert.ok(resolvedModule, "tsc resolves caddychat");
  assert.equal(resolvedModule.resolvedFileName, join(installed, "caddychat.d.ts"));
});
