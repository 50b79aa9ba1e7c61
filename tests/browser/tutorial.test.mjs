// The tutorial's own page (tutorial-page.html: its Vue component's WebSocket logic in plain
// JS) in headless Chromium against a real gateway. The page logs in without a userId and
// recognises its own chat frames by the userId it put in them (a millisecond timestamp), so
// the gateway must echo that id on the sender's own copy, and only there: then each page
// shows each of its own messages exactly once (its local echo) and the other's once.
//
// The page is served from its own origin (as the tutorial's dev server is) and connects to
// the gateway's bare URL, so the gateway must allow that origin (GATEWAY_ALLOWED_ORIGINS); a
// gateway that does not refuses the upgrade (403), which the last test checks.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ARTIFACTS } from './cluster.mjs';
import { startGateway } from './gateway.mjs';
import { launchChromium, phoneContext } from './helpers.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const PAGE = fs.readFileSync(path.join(here, 'tutorial-page.html'));
const ROOM_NAME = '大厅 Lobby'; // the gateway's configured name of room 1 wins over the page's

let pageServer;
let pageOrigin;
let gateway;
let browser;
const pages = [];

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  pageServer = http.createServer((req, res) => {
    if (new URL(req.url, 'http://x').pathname !== '/tutorial.html') {
      res.writeHead(404);
      res.end();
      return;
    }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
    res.end(PAGE);
  });
  await new Promise((resolve) => pageServer.listen(0, '127.0.0.1', resolve));
  pageOrigin = `http://127.0.0.1:${pageServer.address().port}`;
  gateway = await startGateway({
    name: 'tutorial-test',
    env: { GATEWAY_ALLOWED_ORIGINS: pageOrigin },
  });
  browser = await launchChromium();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await gateway?.stop();
    await new Promise((resolve) => (pageServer ? pageServer.close(() => resolve()) : resolve()));
  }
});

/** Opens the tutorial page against `wsUrl`, confirms the nickname. */
async function openTutorial(nickname, wsUrl = gateway.wsUrl) {
  const context = await phoneContext(browser);
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (err) => page.errors.push(String(err)));
  pages.push(page);
  await page.goto(`${pageOrigin}/tutorial.html?ws=${encodeURIComponent(wsUrl)}`);
  await page.fill('#name-input', nickname);
  await page.click('#name-confirm');
  await page.waitForFunction(() => window.tutorial.userId !== '');
  return page;
}

async function enterLobby(page) {
  await page.click('.itemCard[data-room-id="1"]');
  await page.waitForFunction(() => window.tutorial.roomOpen === true, null, { timeout: 15000 });
}

async function say(page, text) {
  await page.fill('#msg-input', text);
  await page.press('#msg-input', 'Enter');
}

/** The page's message list: [{self, name, content}] (notices have no name). */
const msgList = (page) => page.evaluate(() => window.tutorial.msgList.map((m) => ({ ...m })));
const state = (page) => page.evaluate(() => ({
  userId: window.tutorial.userId,
  onlineNum: window.tutorial.onlineNum,
  shownNum: document.getElementById('online-num').textContent,
  received: window.tutorial.receivedFrames,
  sent: window.tutorial.sentFrames.map((t) => JSON.parse(t)),
}));

async function waitShown(page, content, self) {
  await page.waitForFunction(({ content, self }) => window.tutorial.msgList
    .some((m) => m.content === content && !!m.self === self), { content, self }, { timeout: 15000 });
}

async function waitOnline(page, n) {
  await page.waitForFunction((n) => document.getElementById('online-num').textContent === String(n),
    n, { timeout: 15000 });
}

/** Waits until the page has received its own copy of `content` (the echo it must hide). */
async function waitOwnEcho(page, content) {
  await page.waitForFunction((content) => window.tutorial.receivedFrames
    .some((f) => f.content === content && f.userId === window.tutorial.userId), content, { timeout: 15000 });
}

/** The HTTP status of a WebSocket upgrade to `/` with this Origin (none when null). */
function upgradeStatus(port, origin) {
  return new Promise((resolve, reject) => {
    const headers = {
      Connection: 'Upgrade', Upgrade: 'websocket', 'Sec-WebSocket-Version': '13',
      'Sec-WebSocket-Key': 'dGhlIHNhbXBsZSBub25jZQ==',
    };
    if (origin) headers.Origin = origin;
    const req = http.request({ host: '127.0.0.1', port, path: '/', headers });
    req.on('upgrade', (res, socket) => {
      socket.destroy();
      resolve(res.statusCode);
    });
    req.on('response', (res) => {
      res.resume();
      resolve(res.statusCode);
    });
    req.on('error', reject);
    req.end();
  });
}

let a;
let b;

test('two tutorial pages: each shows its own messages once and the other\'s once; counts match', async () => {
  a = await openTutorial('小红');
  // Distinct millisecond ids, as for two people confirming their names.
  await new Promise((r) => setTimeout(r, 5));
  b = await openTutorial('小明');

  await enterLobby(a);
  await waitShown(a, `欢迎小红进入${ROOM_NAME}房间~`, false);
  await waitOnline(a, 1);
  await enterLobby(b);
  await waitShown(b, `欢迎小明进入${ROOM_NAME}房间~`, false);
  await waitShown(a, `欢迎小明进入${ROOM_NAME}房间~`, false);
  await waitOnline(a, 2);
  await waitOnline(b, 2);

  // The login the page sent really has no userId (the tutorial's `userId: this.userName`).
  const login = (await state(a)).sent.find((f) => f.event === 'login');
  assert.equal('userId' in login, false, JSON.stringify(login));
  assert.deepEqual(Object.keys(login).sort(), ['event', 'roomId', 'roomName', 'userName']);

  const script = [
    [a, '你好,小明 👋'],
    [b, '小红你好!'],
    [a, '今天吃什么?'],
    [a, '火锅 🔥'],
    [b, '好呀'],
  ];
  for (const [page, text] of script) {
    const other = page === a ? b : a;
    await say(page, text);
    await waitShown(other, text, false);
    await waitOwnEcho(page, text);
  }

  for (const [page, peer] of [[a, b], [b, a]]) {
    const list = (await msgList(page)).filter((m) => m.name !== undefined);
    const mine = script.filter(([p]) => p === page).map(([, t]) => t);
    const theirs = script.filter(([p]) => p === peer).map(([, t]) => t);
    for (const text of mine) {
      assert.equal(list.filter((m) => m.content === text).length, 1, `${text} shown once on its sender's page: ${JSON.stringify(list)}`);
      assert.equal(list.find((m) => m.content === text).self, true);
    }
    for (const text of theirs) {
      assert.equal(list.filter((m) => m.content === text).length, 1, `${text} shown once on the other page`);
      assert.equal(list.find((m) => m.content === text).self, false);
    }
    // In the order they were said.
    assert.deepEqual(list.map((m) => m.content), script.map(([, t]) => t));
    // The online count matches (and was set from the num of the hidden own echoes too).
    const s = await state(page);
    assert.equal(s.onlineNum, 2);
    assert.equal(s.shownNum, '2');
  }

  // The echo: the sender's own copy carries the userId its chat frame carried (the page's
  // timestamp id, as a string); the other page sees the gateway's guest id instead.
  const sa = await state(a);
  const sb = await state(b);
  const own = sa.received.find((f) => f.content === '你好,小明 👋');
  assert.equal(own.userId, sa.userId);
  assert.equal(typeof own.userId, 'string');
  assert.match(sa.userId, /^\d{13}$/);
  const seenByB = sb.received.find((f) => f.content === '你好,小明 👋');
  assert.match(seenByB.userId, /^guest-[0-9a-f]{32}$/);
  assert.notEqual(seenByB.userId, sa.userId);
  assert.equal(seenByB.userName, '小红');
  assert.equal(seenByB.num, 2);

  await a.screenshot({ path: path.join(ARTIFACTS, 'tutorial-a.png') });
  await b.screenshot({ path: path.join(ARTIFACTS, 'tutorial-b.png') });
  assert.deepEqual([...a.errors, ...b.errors], []);
});

test('the tutorial\'s 25 s heartbeat is answered with a pong', async () => {
  assert.ok(a, 'needs the previous test');
  // Playwright's clock: run the page's 25 s interval without waiting 25 s.
  await a.clock.install();
  // The heartbeat timer was created before the clock was installed: enter again under it.
  await a.evaluate(() => window.tutorial.ws.close());
  await a.waitForFunction(() => window.tutorial.roomOpen === false);
  await enterLobby(a);
  await waitOnline(a, 2);
  await a.clock.runFor(25000);
  await a.waitForFunction(() => window.tutorial.receivedFrames
    .some((f) => f.event === 'heartBeat' && f.content === 'pong'), null, { timeout: 15000 });
  const s = await state(a);
  assert.ok(s.sent.some((f) => f.event === 'heartBeat' && f.content === 'ping'));
  assert.equal(await a.evaluate(() => window.tutorial.heartBeatTimeoutJob), -1, 'the pong cleared the timeout job');
});

test('a page leaving: the other shows the logout notice and the count goes down', async () => {
  assert.ok(a && b, 'needs the first test');
  await b.context().close();
  await waitShown(a, '小明离开房间', false);
  await waitOnline(a, 1);
});

test('without GATEWAY_ALLOWED_ORIGINS the cross-origin tutorial page is refused (403)', async () => {
  const strict = await startGateway({ name: 'tutorial-test-strict' });
  try {
    const page = await openTutorial('小刚', strict.wsUrl);
    await page.click('.itemCard[data-room-id="1"]');
    await page.waitForFunction(() => window.tutorial.toasts.includes('您已离开房间'), null, { timeout: 15000 });
    assert.equal(await page.evaluate(() => window.tutorial.roomOpen), false);
    // The same upgrade without an Origin (not a browser) is let in; with the page's origin: 403.
    assert.equal(await upgradeStatus(strict.port, pageOrigin), 403);
    assert.equal(await upgradeStatus(strict.port, null), 101);
    await page.context().close();
  } finally {
    await strict.stop();
  }
});
