// client.d.ts: compiles with `tsc --strict` against the example app of docs/client.md and the
// misuse checks in types/ (each @ts-expect-error must be a real type error), declares exactly
// what client.js exports (names, ChatClient's methods), and docs/client.md shows the example
// app as it is compiled here.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { STATIC_DIR } from './fake-gateway.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const tsc = path.join(here, 'node_modules', 'typescript', 'bin', 'tsc');
const dts = fs.readFileSync(path.join(STATIC_DIR, 'client.d.ts'), 'utf8');

test('client.d.ts type-checks the example app and rejects the misuses', () => {
  assert.ok(fs.existsSync(tsc), 'typescript is not installed: run npm ci in tests/browser');
  const run = spawnSync(process.execPath, [tsc, '-p', path.join(here, 'types', 'tsconfig.json')], {
    encoding: 'utf8',
  });
  assert.equal(run.status, 0, `tsc failed:\n${run.stdout}${run.stderr}`);
});

test('client.d.ts declares exactly what client.js exports', async () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-types-'));
  try {
    fs.copyFileSync(path.join(STATIC_DIR, 'client.js'), path.join(tmp, 'client.mjs'));
    const mod = await import(path.join(tmp, 'client.mjs'));
    const declared = new Set(
      [...dts.matchAll(/^export declare (?:const|function|class) (\w+)/gm)].map((m) => m[1]),
    );
    if (/^export default ChatClient;/m.test(dts)) declared.add('default');
    assert.deepEqual(new Set(Object.keys(mod)), declared);
    assert.equal(mod.default, mod.ChatClient);

    // Public methods and getters of ChatClient (the `_`-prefixed ones are internal).
    const proto = mod.ChatClient.prototype;
    const actual = new Set(
      Object.getOwnPropertyNames(proto).filter((n) => n !== 'constructor' && !n.startsWith('_')),
    );
    const body = dts.slice(dts.indexOf('export declare class ChatClient'));
    const members = body.slice(0, body.indexOf('\n}\n'));
    const declaredMethods = new Set(
      [...members.matchAll(/^ {2}(\w+)(?:<[^>]*>)?\(/gm)].map((m) => m[1]),
    );
    declaredMethods.delete('constructor');
    declaredMethods.add('connected'); // a getter, declared as a read-only property
    assert.deepEqual(actual, declaredMethods);

    // The runtime constants agree with their declared literal types.
    for (const name of ['STATES', 'CLOSE_CODES']) {
      const block = dts.slice(dts.indexOf(`export declare const ${name}`));
      const fields = block.slice(0, block.indexOf('}>;'));
      const pairs = Object.fromEntries(
        [...fields.matchAll(/^ {2}(\w+): '?([\w]+)'?;/gm)].map((m) => [m[1], m[2]]),
      );
      const runtime = Object.fromEntries(
        Object.entries(mod[name]).map(([k, v]) => [k, String(v)]),
      );
      assert.deepEqual(pairs, runtime, `${name} differs between client.js and client.d.ts`);
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});

test('docs/client.md shows the example app that tsc checks', () => {
  const docs = fs.readFileSync(path.join(here, '..', '..', 'docs', 'client.md'), 'utf8');
  const app = fs.readFileSync(path.join(here, 'types', 'example-app.ts'), 'utf8');
  // The docs import from the served path; the test file from the repository.
  const served = app.replace("'../../../gateway/static/client.js'", "'/client.js'");
  assert.ok(docs.includes(served.trim()), 'docs/client.md does not contain types/example-app.ts');
});
