// Signed in: the chat page (app.js) and client.js against a real gateway with a JWT key. The
// page opened as /?token=… is the token's user (sub, name), lists rooms with the token, and
// chats; with &tokenUrl= it renews a short-lived token before the gateway's 4001 close. In
// node, client.js without refreshToken stops in state `unauthorized` at the 4001.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WebSocket } from 'ws';
import { ARTIFACTS } from './cluster.mjs';
import { STATIC_DIR } from './fake-gateway.mjs';
import { startGateway, mintToken, TEST_SECRET } from './gateway.mjs';
import {
  launchChromium, phoneContext, enterRoom, say, shown, waitFor, waitMessage, waitNotice, waitOnline,
} from './helpers.mjs';

const ROOM_NAME = '大厅 Lobby';

let gateway;
let browser;

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  gateway = await startGateway({
    name: 'page-auth-test',
    env: {
      GATEWAY_JWT_SECRET: TEST_SECRET,
      GATEWAY_JWT_LEEWAY_SECS: '0',
    },
  });
  browser = await launchChromium();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await gateway?.stop();
  }
});

/**
 * Opens the page with `query` (token, tokenUrl); `route` may serve the token URL. Waits for
 * the connection and records the states it goes through in window.__states.
 */
async function openSignedIn(query, { route = null } = {}) {
  const context = await phoneContext(browser);
  if (route) await context.route(route.url, route.handler);
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (err) => page.errors.push(String(err)));
  page.on('console', (msg) => {
    if (msg.type() === 'error') page.errors.push(`console: ${msg.text()}`);
  });
  await page.goto(`${gateway.url}/?${new URLSearchParams(query)}`);
  await page.waitForSelector('#conn-state[data-state="connected"]', { timeout: 15000 });
  await page.evaluate(() => {
    window.__states = [window.chatApp.client.state];
    window.chatApp.client.on('state', (s) => window.__states.push(s));
  });
  return page;
}

test('the API needs a token; the rooms claim limits what /api/rooms lists', async () => {
  const res = await fetch(`${gateway.url}/api/rooms`);
  assert.equal(res.status, 401);
  const body = await res.json();
  assert.equal(body.error, 'unauthorized');
  assert.equal(body.reason, 'missing');
  const all = await mintToken({ sub: 'lister', ttl: 60 });
  const listed = await (await fetch(`${gateway.url}/api/rooms`, { headers: { Authorization: `Bearer ${all}` } })).json();
  assert.ok(listed.rooms.some((r) => r.roomId === 1), JSON.stringify(listed));
  const team = await mintToken({ sub: 'lister', ttl: 60, rooms: 'team-*' });
  const few = await (await fetch(`${gateway.url}/api/rooms`, { headers: { Authorization: `Bearer ${team}` } })).json();
  assert.deepEqual(few.rooms, []);
});

test('a page opened with ?token= is the token\'s user: lists rooms, joins, chats', async () => {
  const alice = await mintToken({ sub: 'alice', name: 'Alice 爱丽丝', ttl: 3600 });
  const bob = await mintToken({ sub: 'bob', name: 'Bob', ttl: 3600 });
  const a = await openSignedIn({ token: alice });
  const b = await openSignedIn({ token: bob });

  for (const [page, name, sub] of [[a, 'Alice 爱丽丝', 'alice'], [b, 'Bob', 'bob']]) {
    // The token left the address bar (kept for this tab in sessionStorage).
    assert.equal(new URL(page.url()).search, '');
    assert.equal(await page.evaluate(() => sessionStorage.getItem('chat.token') !== null), true);
    // The name is the token's: shown, not editable.
    assert.equal(await page.textContent('#nickname'), name);
    assert.equal(await page.isHidden('#name-form'), true);
    assert.equal(await page.isHidden('#rename'), true);
    assert.equal(await page.evaluate(() => window.chatApp.client.userId), sub);
    // /api/rooms answered (it needs the token): the default rooms are there.
    await page.waitForSelector('.itemCard[data-room-id="1"]', { timeout: 15000 });
  }

  await enterRoom(a, 1);
  await waitNotice(a, `欢迎Alice 爱丽丝进入${ROOM_NAME}房间~`);
  await enterRoom(b, 1);
  await waitNotice(a, `欢迎Bob进入${ROOM_NAME}房间~`);
  await waitOnline(a, 2);
  await waitOnline(b, 2);

  await say(a, 'hello from a token 🔑');
  await waitMessage(a, 'hello from a token 🔑', { own: true, status: 'sent' });
  await waitMessage(b, 'hello from a token 🔑', { own: false });
  await say(b, '收到');
  await waitMessage(a, '收到', { own: false });

  const onB = (await shown(b)).find((m) => m.text === 'hello from a token 🔑');
  assert.equal(onB.who, 'Alice 爱丽丝');
  const ids = await b.$$eval('#msg-list .msgItem', (items) => items.map((li) => [li.querySelector('.bubble').textContent, li.dataset.userId]));
  assert.deepEqual(ids, [['hello from a token 🔑', 'alice'], ['收到', 'bob']]);
  const own = (await shown(a)).filter((m) => m.kind === 'message');
  assert.deepEqual(own.map((m) => [m.text, m.own, m.who]), [['hello from a token 🔑', true, '我'], ['收到', false, 'Bob']]);

  // The member list (it needs the token too) names both, marking our own entry.
  await a.click('#online-btn');
  await a.waitForFunction(() => document.querySelectorAll('#member-list li[data-user-id]').length === 2, null, { timeout: 15000 });
  const members = await a.$$eval('#member-list li', (items) => items.map((li) => [li.dataset.userId, li.textContent]).sort());
  assert.deepEqual(members, [['alice', 'Alice 爱丽丝(我)'], ['bob', 'Bob']]);

  await a.screenshot({ path: path.join(ARTIFACTS, 'auth-a-chat.png') });
  assert.deepEqual([...a.errors, ...b.errors], []);
  await a.context().close();
  await b.context().close();
});

test('a 3-second token and a tokenUrl: the page refreshes it and stays connected past expiry', async () => {
  let served = 0;
  const route = {
    url: `${gateway.url}/test-token`,
    handler: async (r) => {
      served += 1;
      const token = await mintToken({ sub: 'carol', name: 'Carol', ttl: 3 });
      // Alternate the two answer forms the page accepts.
      if (served % 2) await r.fulfill({ status: 200, contentType: 'text/plain', body: `${token}\n` });
      else await r.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify({ token }) });
    },
  };
  const first = await mintToken({ sub: 'carol', name: 'Carol', ttl: 3 });
  const c = await openSignedIn({ token: first, tokenUrl: '/test-token' }, { route });
  const firstExp = await c.evaluate(() => window.chatApp.client.tokenExp);
  await enterRoom(c, 1);
  await waitNotice(c, `欢迎Carol进入${ROOM_NAME}房间~`);
  // The gateway (leeway 0) would close at the first token's exp; wait well past it.
  await waitFor('2 s past the first token\'s expiry', () => Date.now() / 1000 > firstExp + 2, 10000, 100);
  const states = await c.evaluate(() => window.__states);
  assert.deepEqual(states, ['connected'], 'never disconnected');
  assert.ok(served >= 2, `tokenUrl fetched ${served} times`);
  assert.ok(await c.evaluate(() => window.chatApp.client.tokenExp) > firstExp);
  // The refreshed token is kept for a reload of this tab.
  assert.equal(await c.evaluate(() => sessionStorage.getItem('chat.token') === window.chatApp.client.token), true);
  await say(c, 'still connected');
  await waitMessage(c, 'still connected', { own: true, status: 'sent' });
  assert.deepEqual(c.errors, []);
  await c.context().close();
});

test('client.js in node: a 2-second token without refreshToken ends in state unauthorized (4001)', async () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-client-auth-'));
  fs.copyFileSync(path.join(STATIC_DIR, 'client.js'), path.join(tmp, 'client.mjs'));
  const { ChatClient, STATES } = await import(path.join(tmp, 'client.mjs'));
  const token = await mintToken({ sub: 'dave', ttl: 2 });
  const c = new ChatClient({ url: `${gateway.wsUrl}/ws`, WebSocket, token, backoffInitialMs: 50 });
  const states = [];
  const errors = [];
  c.on('state', (s, info) => states.push([s, info.code]));
  c.on('error', (e) => errors.push(e));
  try {
    c.connect();
    c.join('dave-room');
    await waitFor('joined', () => c.rooms.get('dave-room')?.joined, 10000);
    await waitFor('unauthorized', () => c.state === STATES.UNAUTHORIZED, 10000);
    assert.deepEqual(states.at(-1), [STATES.UNAUTHORIZED, 4001]);
    assert.ok(errors.some((e) => e.code === 'unauthorized' && e.reason === 'expired'));
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(c.ws, null, 'no reconnect');
    // A new token resumes it.
    assert.equal(c.setToken(await mintToken({ sub: 'dave', ttl: 60 })), true);
    await waitFor('joined again', () => c.state === STATES.CONNECTED && c.rooms.get('dave-room')?.joined, 10000);
  } finally {
    c.close();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});
