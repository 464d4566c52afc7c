// The hand-written caddychat.d.ts against caddychat.js itself, so that an
// export, a method, an option, an event (or a field of one) or an error code
// added to or removed from either side without the other fails `make
// typecheck`. The declarations are read with the TypeScript parser; the
// library both as it runs (its exports and prototypes) and as written (its
// parameters, the options it reads, the events it emits, the codes it throws).
// usage.ts (tsc) checks that the declared types are the ones the README
// documents.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import ts from "typescript";
import * as lib from "../caddychat.js";

const read = (name) => readFileSync(new URL(name, import.meta.url), "utf8");
const dts = ts.createSourceFile("caddychat.d.ts", read("../caddychat.d.ts"), ts.ScriptTarget.Latest, true, ts.ScriptKind.TS);
const js = ts.createSourceFile("caddychat.js", read("../caddychat.js"), ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);
const protocol = read("../../PROTOCOL.md");

const sorted = (iterable) => [...new Set(iterable)].sort();
const nameOf = (node) => node.name && (ts.isIdentifier(node.name) || ts.isStringLiteral(node.name) || ts.isPrivateIdentifier(node.name)) ? node.name.text : undefined;
const isExported = (node) => ts.getModifiers?.(node)?.some((m) => m.kind === ts.SyntaxKind.ExportKeyword) ?? false;
const isStatic = (node) => ts.getModifiers?.(node)?.some((m) => m.kind === ts.SyntaxKind.StaticKeyword) ?? false;

function walk(node, visit) {
  visit(node);
  ts.forEachChild(node, (child) => walk(child, visit));
}

// ---- the declarations ----

function declaration(name) {
  const node = dts.statements.find((s) => nameOf(s) === name || (ts.isVariableStatement(s) && s.declarationList.declarations.some((d) => nameOf(d) === name)));
  assert.ok(node, `caddychat.d.ts declares no ${name}`);
  return node;
}

// The exported values (not the types) the declarations promise.
function declaredValues() {
  const names = [];
  for (const s of dts.statements) {
    if (!isExported(s)) continue;
    if (ts.isVariableStatement(s)) names.push(...s.declarationList.declarations.map(nameOf));
    else if (ts.isFunctionDeclaration(s) || ts.isClassDeclaration(s)) names.push(nameOf(s));
  }
  return sorted(names);
}

// An interface's (or an object type alias's) member names.
function members(name) {
  const node = declaration(name);
  const list = ts.isInterfaceDeclaration(node) ? node.members : ts.isTypeAliasDeclaration(node) && ts.isTypeLiteralNode(node.type) ? node.type.members : null;
  assert.ok(list, `${name} in caddychat.d.ts is not an object type`);
  return sorted(list.map(nameOf));
}

// The string literals of a union type (as written, e.g. ErrorCode or a property's type).
function literals(type) {
  const out = [];
  walk(type, (n) => {
    if (ts.isLiteralTypeNode(n) && ts.isStringLiteral(n.literal)) out.push(n.literal.text);
  });
  return sorted(out);
}

function memberType(interfaceName, member) {
  const node = declaration(interfaceName);
  const m = node.members.find((x) => nameOf(x) === member);
  assert.ok(m?.type, `${interfaceName}.${member} is not declared`);
  return m.type;
}

// name → parameter count, for a declared class's members (static or not) or the module's functions.
function declaredClass(name) {
  const node = declaration(name);
  assert.ok(ts.isClassDeclaration(node), `${name} is not declared as a class`);
  const instance = new Map();
  const statics = new Map();
  let ctor = null;
  for (const m of node.members) {
    if (ts.isConstructorDeclaration(m)) ctor = m.parameters.length;
    else (isStatic(m) ? statics : instance).set(nameOf(m), ts.isMethodDeclaration(m) ? m.parameters.length : null);
  }
  return { instance, statics, ctor };
}

// ---- the library as written ----

// The JS class's members: name → parameter count (null for accessors and fields).
function jsClass(name) {
  const node = js.statements.find((s) => ts.isClassDeclaration(s) && nameOf(s) === name);
  assert.ok(node, `caddychat.js has no class ${name}`);
  const methods = new Map();
  let ctor = null;
  for (const m of node.members) {
    if (ts.isConstructorDeclaration(m)) ctor = m.parameters.length;
    else if (ts.isMethodDeclaration(m) && !ts.isPrivateIdentifier(m.name)) methods.set(nameOf(m), m.parameters.length);
  }
  return { node, methods, ctor };
}

function jsFunction(name) {
  const node = js.statements.find((s) => ts.isFunctionDeclaration(s) && nameOf(s) === name);
  assert.ok(node, `caddychat.js has no function ${name}`);
  return node;
}

// Calls of this.#<method>(...) anywhere in the library.
function privateCalls(method) {
  const calls = [];
  walk(js, (n) => {
    if (ts.isCallExpression(n) && ts.isPropertyAccessExpression(n.expression) && n.expression.name.text === method) calls.push(n);
  });
  return calls;
}

// `<object>.<name>` reads inside a node, for a given object identifier.
function reads(node, object) {
  const out = [];
  walk(node, (n) => {
    if (ts.isPropertyAccessExpression(n) && ts.isIdentifier(n.expression) && n.expression.text === object) out.push(n.name.text);
  });
  return sorted(out);
}

function objectKeys(literal) {
  return literal.properties.map((p) => (ts.isShorthandPropertyAssignment(p) ? p.name.text : nameOf(p)));
}

// ---- the checks ----

test("the declarations export the values caddychat.js exports, and only those", () => {
  assert.deepEqual(declaredValues(), sorted(Object.keys(lib)));
});

test("exported functions take as many parameters as declared", () => {
  for (const name of Object.keys(lib)) {
    if (typeof lib[name] !== "function" || /^class\b/.test(Function.prototype.toString.call(lib[name]))) continue;
    const declared = declaration(name);
    assert.ok(ts.isFunctionDeclaration(declared), `${name} is a function in caddychat.js`);
    assert.equal(declared.parameters.length, jsFunction(name).parameters.length, `${name}'s parameters`);
  }
});

test("exported constants have the declared values", () => {
  for (const name of ["TOKEN_EXPIRED", "DISCONNECTED_BY_SERVER", "TOKEN_REVOKED"]) {
    assert.equal(typeof lib[name], "number", `${name} is a number`);
    assert.equal(declaration(name).declarationList.declarations[0].type.literal.text, String(lib[name]), `${name}'s value`);
  }
  assert.ok(Object.isFrozen(lib.PERMANENT_CLOSE_CODES), "PERMANENT_CLOSE_CODES is declared readonly");
});

// Error's own members, which the declarations inherit from lib.es2022.
const ERROR_MEMBERS = new Set(["name", "message", "stack", "cause"]);

// Fields caddychat.js sets on its errors outside the constructor: the keys of
// `new CaddyChatError(code, message, {…})` details and `err.<field> = …`.
function dynamicErrorFields() {
  const out = [];
  walk(js, (n) => {
    if (ts.isNewExpression(n) && n.expression.getText() === "CaddyChatError" && n.arguments?.[2] && ts.isObjectLiteralExpression(n.arguments[2])) out.push(...objectKeys(n.arguments[2]));
    if (ts.isBinaryExpression(n) && n.operatorToken.kind === ts.SyntaxKind.EqualsToken && ts.isPropertyAccessExpression(n.left) && n.left.expression.getText() === "err") out.push(n.left.name.text);
  });
  return out;
}

for (const [name, make] of [
  ["CaddyChat", () => {
    class QuietSocket {
      send() {}
      close() {}
    }
    const chat = new lib.CaddyChat("ws://127.0.0.1:9/never", { WebSocket: QuietSocket, setTimeout: () => 0, clearTimeout: () => {} });
    chat.close();
    return chat;
  }],
  ["CaddyChatError", () => new lib.CaddyChatError("timeout", "m")],
]) {
  test(`class ${name}: the declared members are the library's, with its parameter counts`, () => {
    const cls = lib[name];
    const declared = declaredClass(name);
    const written = jsClass(name);
    const instance = make();
    const runtime = sorted([
      ...Object.getOwnPropertyNames(cls.prototype).filter((k) => k !== "constructor"),
      ...Object.keys(instance),
      ...(name === "CaddyChatError" ? dynamicErrorFields() : []),
    ].filter((k) => !ERROR_MEMBERS.has(k)));
    assert.deepEqual(sorted(declared.instance.keys()), runtime, `${name}'s instance members`);
    const statics = Object.getOwnPropertyNames(cls).filter((k) => !["length", "name", "prototype"].includes(k));
    assert.deepEqual(sorted(declared.statics.keys()), sorted(statics), `${name}'s static members`);
    assert.equal(declared.ctor, written.ctor, `${name}'s constructor parameters`);
    for (const [method, count] of written.methods) {
      assert.equal(declared.instance.get(method), count, `${name}.${method}'s parameters`);
    }
  });
}

test("CaddyChatOptions are the options the constructor reads", () => {
  const ctor = jsClass("CaddyChat").node.members.find(ts.isConstructorDeclaration);
  assert.deepEqual(members("CaddyChatOptions"), reads(ctor, "options"));
});

test("BackoffOptions are the backoff's fields", () => {
  const def = js.statements.flatMap((s) => (ts.isVariableStatement(s) ? s.declarationList.declarations : [])).find((d) => nameOf(d) === "DEFAULT_BACKOFF");
  const literal = def.initializer.arguments[0];
  assert.deepEqual(members("BackoffOptions"), sorted(objectKeys(literal)));
  const params = jsFunction("backoffDelay").parameters[1].name;
  assert.deepEqual(members("BackoffOptions"), sorted(params.elements.map((e) => e.name.text)));
});

test("SubscribeOptions and HistoryOptions are what subscribe() and history() read", () => {
  const subscribe = jsClass("CaddyChat").node.members.find((m) => nameOf(m) === "subscribe");
  assert.deepEqual(members("SubscribeOptions"), reads(subscribe, "options"));
  const history = jsClass("CaddyChat").node.members.find((m) => nameOf(m) === "history");
  assert.deepEqual(members("HistoryOptions"), sorted(history.parameters[1].name.elements.map((e) => e.name.text)));
});

test("CaddyChatEvents are the events the client emits, with the fields it emits", () => {
  const emits = privateCalls("#emit").map((c) => c.arguments);
  const names = emits.map(([event]) => {
    assert.ok(ts.isStringLiteral(event), `#emit with a computed event name: ${event.getText()}`);
    return event.text;
  });
  assert.deepEqual(members("CaddyChatEvents"), sorted(names));

  // Events emitted as object literals: their keys are the declared interface's members.
  const keys = new Map();
  for (const [event, arg] of emits) {
    if (!arg || !ts.isObjectLiteralExpression(arg)) continue;
    keys.set(event.text, [...(keys.get(event.text) ?? []), ...objectKeys(arg)]);
  }
  for (const [event, fields] of keys) {
    const type = memberType("CaddyChatEvents", event);
    assert.ok(ts.isTypeReferenceNode(type), `CaddyChatEvents.${event} names an interface`);
    assert.deepEqual(members(type.typeName.getText()), sorted(fields), `the fields of the ${event} event`);
  }
});

test("ConnectionState is the states the client goes through", () => {
  const states = [];
  // Every string the argument can be (it may be a conditional).
  for (const c of privateCalls("#setState")) walk(c.arguments[0], (n) => ts.isStringLiteral(n) && states.push(n.text));
  const initial = jsClass("CaddyChat").node.members.find((m) => ts.isPropertyDeclaration(m) && nameOf(m) === "#state").initializer.text;
  assert.deepEqual(literals(declaration("ConnectionState").type), sorted([...states, initial]));
});

test("GapEvent.reason is the reasons the client gives", () => {
  const reasons = [];
  for (const c of privateCalls("#emit")) {
    if (c.arguments[0].text !== "gap") continue;
    const reason = c.arguments[1].properties.find((p) => nameOf(p) === "reason");
    reasons.push(reason.initializer.text);
  }
  assert.deepEqual(literals(memberType("GapEvent", "reason")), sorted(reasons));
  // describeGap handles the same reasons.
  const handled = [];
  walk(jsFunction("describeGap"), (n) => {
    if (ts.isBinaryExpression(n) && n.left.getText() === "reason" && ts.isStringLiteral(n.right)) handled.push(n.right.text);
  });
  for (const r of handled) assert.ok(reasons.includes(r), `describeGap tests for an unknown reason ${r}`);
});

test("ErrorCode is the server's codes (PROTOCOL.md) and the client's own", () => {
  const table = protocol.split("| code | when |")[1].split("\n\n")[0];
  const server = [...table.matchAll(/^\| `(\w+)` \|/gm)].map((m) => m[1]);
  assert.ok(server.length >= 5, "PROTOCOL.md's table of error codes was not found");
  const client = [];
  walk(js, (n) => {
    if (ts.isNewExpression(n) && n.expression.getText() === "CaddyChatError" && n.arguments?.[0] && ts.isStringLiteral(n.arguments[0])) client.push(n.arguments[0].text);
  });
  assert.deepEqual(literals(declaration("ErrorCode").type), sorted([...server, ...client]));
});
