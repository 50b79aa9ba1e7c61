// The chat page in headless Chromium against the scripted fake gateway (fake-gateway.mjs):
// layout and behaviours that do not need the real cluster (own messages on the right,
// auto-scroll unless scrolled up, phone-sized layout, connection state, pending messages).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FakeGateway } from './fake-gateway.mjs';
import { ARTIFACTS } from './cluster.mjs';
import {
  launchChromium, phoneContext, openChat, enterRoom, say, shown, waitMessage, waitNotice,
  waitOnline,
} from './helpers.mjs';

let fake;
let browser;

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  fake = await new FakeGateway({
    defaultRooms: [{ roomId: 1, roomName: '大厅 Lobby' }, { roomId: 2, roomName: '技术 Tech' }],
  }).start();
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  await fake?.stop();
});

test('home: room list with counts; a nickname is needed before entering', async () => {
  const context = await phoneContext(browser);
  const page = await context.newPage();
  try {
    await page.goto(`${fake.url}/`);
    await page.waitForSelector('.itemCard[data-room-id="2"]');
    const cards = await page.$$eval('.itemCard', (els) => els.map((e) => e.textContent));
    assert.ok(cards[0].includes('大厅 Lobby') && cards[0].includes('在线 0 人'), cards[0]);
    assert.equal(await page.textContent('#title'), '首页');
    await page.click('.itemCard[data-room-id="1"]');
    assert.equal(await page.textContent('#home-hint'), '先起个好听的名字吧~');
    assert.equal(await page.isHidden('#room'), true);
    await page.screenshot({ path: path.join(ARTIFACTS, 'fake-home.png') });
  } finally {
    await context.close();
  }
});

test('room: own messages on the right, notices, count, Chinese and emoji', async () => {
  const a = await openChat(browser, fake.url, '小红');
  const b = await openChat(browser, fake.url, 'Bob');
  try {
    await enterRoom(a, 1);
    await waitNotice(a, '欢迎小红进入大厅 Lobby房间~');
    await waitOnline(a, 1);
    await enterRoom(b, 1);
    await waitNotice(a, '欢迎Bob进入大厅 Lobby房间~');
    await waitOnline(a, 2);
    await say(a, '你好 👋 世界');
    await waitMessage(a, '你好 👋 世界', { status: 'sent', own: true });
    await waitMessage(b, '你好 👋 世界', { own: false });
    // Own bubble hugs the right edge, the other's the left edge.
    const ownBox = await a.locator('.selfItem .bubble').boundingBox();
    const otherBox = await b.locator('.msgItem:not(.selfItem) .bubble').boundingBox();
    assert.ok(ownBox.x + ownBox.width > 390 - 60, `own bubble on the right: ${JSON.stringify(ownBox)}`);
    assert.ok(otherBox.x < 120, `other bubble on the left: ${JSON.stringify(otherBox)}`);
    assert.equal(await b.textContent('.msgItem:not(.selfItem) .who'), '小红');
    assert.equal(await a.textContent('.selfItem .who'), '我');
    // The online count opens the member list.
    await a.click('#online-btn');
    await a.waitForFunction(() => document.querySelectorAll('#member-list li[data-user-id]').length === 2);
    const names = await a.$$eval('#member-list li', (els) => els.map((e) => e.textContent).sort());
    assert.deepEqual(names, ['Bob', '小红(我)']);
    await a.click('#msg-box');
    assert.equal(await a.isHidden('#members'), true);
    await b.click('#back');
    await waitNotice(a, 'Bob离开房间');
    await waitOnline(a, 1);
    assert.deepEqual([...a.errors, ...b.errors], []);
  } finally {
    await a.context().close();
    await b.context().close();
  }
});

test('auto-scroll follows new messages unless the user scrolled up', async () => {
  const page = await openChat(browser, fake.url, 'Scroller');
  try {
    await enterRoom(page, 2);
    await waitOnline(page, 1);
    for (let i = 0; i < 40; i += 1) fake.inject(2, 'u-other', `line ${i} 滚动`);
    await waitMessage(page, 'line 39 滚动');
    const gap = () => page.$eval('#msg-box', (b) => b.scrollHeight - b.scrollTop - b.clientHeight);
    assert.ok(await gap() <= 2, 'at the bottom after new messages');
    await page.$eval('#msg-box', (b) => { b.scrollTop = 0; b.dispatchEvent(new Event('scroll')); });
    fake.inject(2, 'u-other', 'while scrolled up');
    await waitMessage(page, 'while scrolled up');
    assert.equal(await page.$eval('#msg-box', (b) => b.scrollTop), 0, 'stays where the user is');
    assert.equal(await page.isVisible('#new-msg-tip'), true);
    await page.click('#new-msg-tip');
    assert.ok(await gap() <= 2, 'back at the bottom');
    // Sending always jumps to the newest message.
    await page.$eval('#msg-box', (b) => { b.scrollTop = 0; b.dispatchEvent(new Event('scroll')); });
    await say(page, 'mine');
    await waitMessage(page, 'mine', { status: 'sent' });
    assert.ok(await gap() <= 2);
    // Phone-sized: nothing sticks out sideways; the input row is on screen.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `horizontal overflow ${overflow}px`);
    const send = await page.locator('#send').boundingBox();
    assert.ok(send.y + send.height <= 760 && send.x + send.width <= 390, JSON.stringify(send));
    await page.screenshot({ path: path.join(ARTIFACTS, 'fake-scroll.png') });
  } finally {
    await page.context().close();
  }
});

test('connection state and pending messages across a server restart', async () => {
  const page = await openChat(browser, fake.url, '断线王');
  try {
    await enterRoom(page, 1);
    await waitOnline(page, 1);
    fake.freeze(true);
    await say(page, '等等我');
    await waitMessage(page, '等等我', { status: 'sending' });
    assert.equal(await page.textContent('.selfItem .status'), '发送中…');
    fake.terminateAll(); // killed while stalled: the message was never processed
    fake.freeze(false);
    await page.waitForFunction(() => window.__states.includes('reconnecting'));
    await page.waitForSelector('#conn-state[data-state="connected"]');
    await waitMessage(page, '等等我', { status: 'sent' });
    const mine = (await shown(page)).filter((m) => m.text === '等等我');
    assert.equal(mine.length, 1);
    assert.equal(fake.messages(1).filter((m) => m.content === '等等我').length, 1);
    // No second welcome for our own re-join.
    const welcomes = (await shown(page)).filter((m) => m.text === '欢迎断线王进入大厅 Lobby房间~');
    assert.equal(welcomes.length, 1);
    assert.deepEqual(page.errors, []);
  } finally {
    await page.context().close();
  }
});
