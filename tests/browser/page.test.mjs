// The chat page in headless Chromium against a real cluster: redis-server, two gateway nodes
// and nginx in front (cluster.mjs). Two pages on different nodes chat; then the node of one
// page is killed and that page must reconnect through nginx to the other node without losing
// or doubling anything. Screenshots go to artifacts/browser/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Cluster, ARTIFACTS } from './cluster.mjs';
import {
  launchChromium, phoneContext, openChat, enterRoom, say, shown, waitFor, waitMessage,
  waitNotice, waitOnline,
} from './helpers.mjs';

const ROOM = 1;
const ROOM_NAME = '大厅 Lobby';

let cluster;
let browser;
let a; // 小红
let b; // 小明
let lobby; // a third page that only watches the room list
let nodeOfA;
let nodeOfB;

const shot = (page, name) => page.screenshot({ path: path.join(ARTIFACTS, `${name}.png`) });

/** Which node holds the page's WebSocket: the one whose open count went up by one. */
async function openOnOtherNode(nickname, avoidNode) {
  for (let attempt = 1; attempt <= 5; attempt += 1) {
    const before = await cluster.connections();
    const page = await openChat(browser, cluster.url, nickname);
    const after = await waitFor(`${nickname}'s connection counted`, async () => {
      const now = await cluster.connections();
      const total = Object.values(now).reduce((x, y) => x + y, 0);
      const was = Object.values(before).reduce((x, y) => x + y, 0);
      return total === was + 1 ? now : null;
    });
    const node = Object.keys(after).find((id) => after[id] === (before[id] ?? 0) + 1);
    if (node !== avoidNode) return { page, node };
    // least_conn put it next to the other page after all: try again.
    await page.context().close();
    await waitFor('connection closed', async () => {
      const now = await cluster.connections();
      return Object.values(now).reduce((x, y) => x + y, 0) === Object.values(before).reduce((x, y) => x + y, 0);
    });
  }
  throw new Error(`could not place ${nickname} on a node other than ${avoidNode}`);
}

async function roomCardCount(page, roomId, n, timeout = 20000) {
  await page.waitForFunction(({ roomId, n }) => {
    const card = document.querySelector(`.itemCard[data-room-id="${roomId}"] .count`);
    return card && card.dataset.num === String(n);
  }, { roomId: String(roomId), n }, { timeout });
}

before(async () => {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  cluster = new Cluster({
    nodes: 2,
    name: 'page-test',
    env: {
      GATEWAY_DEFAULT_ROOMS: `${ROOM}:${ROOM_NAME},2:技术 Tech,3:闲聊 Random`,
      GATEWAY_PRESENCE_TTL_MS: '3000',
    },
  });
  await cluster.start();
  browser = await launchChromium();
});

after(async () => {
  try {
    await browser?.close();
  } finally {
    await cluster?.stop();
  }
});

test('the page and its assets are served through nginx; /api/rooms lists the default rooms', async () => {
  for (const [file, type] of [['/', 'text/html'], ['/client.js', 'javascript'], ['/app.js', 'javascript'], ['/app.css', 'text/css']]) {
    const res = await fetch(`${cluster.url}${file}`);
    assert.equal(res.status, 200, file);
    assert.ok((res.headers.get('content-type') || '').includes(type), `${file}: ${res.headers.get('content-type')}`);
  }
  // A fresh cluster (nobody has joined any room yet) still lists its default rooms.
  const res = await fetch(`${cluster.url}/api/rooms`);
  const text = await res.text();
  assert.equal(res.status, 200, `GET /api/rooms on a fresh cluster: ${res.status} ${text}`);
  const rooms = JSON.parse(text);
  const lobbyRoom = rooms.rooms.find((r) => r.roomId === ROOM);
  assert.ok(lobbyRoom, JSON.stringify(rooms));
  assert.equal(lobbyRoom.roomName, ROOM_NAME);
  assert.equal(lobbyRoom.num, 0);
});

test('two pages on two nodes behind nginx: join, chat both ways, count and notices update', async () => {
  lobby = await (await phoneContext(browser)).newPage();
  await lobby.goto(`${cluster.url}/`);
  await roomCardCount(lobby, ROOM, 0);

  ({ page: a, node: nodeOfA } = await openOnOtherNode('小红', null));
  ({ page: b, node: nodeOfB } = await openOnOtherNode('小明', nodeOfA));
  assert.notEqual(nodeOfA, nodeOfB);

  await enterRoom(a, ROOM);
  await waitNotice(a, `欢迎小红进入${ROOM_NAME}房间~`);
  await waitOnline(a, 1);
  assert.equal(await a.textContent('#title'), ROOM_NAME);

  await enterRoom(b, ROOM);
  await waitNotice(b, `欢迎小明进入${ROOM_NAME}房间~`);
  await waitNotice(a, `欢迎小明进入${ROOM_NAME}房间~`);
  await waitOnline(a, 2);
  await waitOnline(b, 2);

  await say(a, '你好,小明 👋');
  await waitMessage(a, '你好,小明 👋', { own: true, status: 'sent' });
  await waitMessage(b, '你好,小明 👋', { own: false });
  await say(b, '小红你好!今天吃什么?🍜');
  await waitMessage(b, '小红你好!今天吃什么?🍜', { own: true, status: 'sent' });
  await waitMessage(a, '小红你好!今天吃什么?🍜', { own: false });
  await say(a, '火锅 🔥🔥');
  await waitMessage(b, '火锅 🔥🔥', { own: false });

  // The other page's messages name their sender; own ones are marked 我 and on the right.
  const seenByB = await shown(b);
  assert.equal(seenByB.find((m) => m.text === '你好,小明 👋').who, '小红');
  assert.equal(seenByB.find((m) => m.text === '小红你好!今天吃什么?🍜').who, '我');

  // The room list of a third page shows the live count.
  await roomCardCount(lobby, ROOM, 2);
  await shot(a, 'cluster-a-chat');
  await shot(b, 'cluster-b-chat');
  await shot(lobby, 'cluster-lobby');
});

test('the node of one page is killed: it reconnects through nginx, nothing lost or doubled', async () => {
  assert.ok(a && b, 'needs the previous test');
  const victim = cluster.node(nodeOfB);
  const survivor = cluster.node(nodeOfA);

  // Freeze B's node first, so that B's next message reaches a node that never answers, and
  // what A says next cannot reach B: then kill it.
  cluster.freezeNode(victim);
  await say(b, '我这边断线了吗?');
  await waitMessage(b, '我这边断线了吗?', { own: true, status: 'sending' });
  const meanwhile = ['断线期间的消息 1', '断线期间的消息 2 🚀', '断线期间的消息 3'];
  for (const text of meanwhile) {
    await say(a, text);
    await waitMessage(a, text, { own: true, status: 'sent' });
  }
  assert.equal((await shown(b)).filter((m) => meanwhile.includes(m.text)).length, 0);
  assert.equal((await shown(b)).find((m) => m.text === '我这边断线了吗?').status, 'sending');

  await cluster.killNode(victim);

  // B notices, reconnects through nginx, and lands on the surviving node.
  await b.waitForFunction(() => window.__states.includes('reconnecting'), null, { timeout: 15000 });
  await b.waitForSelector('#conn-state[data-state="connected"]', { timeout: 30000 });
  await waitFor('B on the surviving node', async () => (await cluster.connections())[survivor.id] === 2, 20000);

  // The messages sent meanwhile appear, and B's unconfirmed message is delivered.
  for (const text of meanwhile) await waitMessage(b, text, { own: false });
  await waitMessage(b, '我这边断线了吗?', { own: true, status: 'sent' });
  await waitMessage(a, '我这边断线了吗?', { own: false });

  // Barrier: messages arrive in id order, so once these are shown, any double would be too.
  await say(a, '收到了吗?');
  await waitMessage(b, '收到了吗?');
  await say(b, '收到 ✅ 都在');
  await waitMessage(a, '收到 ✅ 都在');
  await waitMessage(b, '收到 ✅ 都在', { status: 'sent' });

  for (const page of [a, b]) {
    const items = (await shown(page)).filter((m) => m.kind === 'message');
    const texts = items.map((m) => m.text);
    assert.equal(new Set(texts).size, texts.length, `a message shown twice: ${JSON.stringify(texts)}`);
    const ids = items.map((m) => m.id);
    assert.ok(ids.every(Boolean), 'every shown message has its id');
    assert.equal(new Set(ids).size, ids.length, 'ids shown once');
    for (const text of [...meanwhile, '我这边断线了吗?']) {
      assert.equal(texts.filter((t) => t === text).length, 1, `${text} exactly once`);
    }
  }
  // Order on B: what was said before, the three sent meanwhile, then the rest.
  const orderB = (await shown(b)).filter((m) => m.kind === 'message').map((m) => m.text);
  const pos = meanwhile.map((t) => orderB.indexOf(t));
  assert.deepEqual([...pos].sort((x, y) => x - y), pos, `order: ${JSON.stringify(orderB)}`);
  // B's own re-join after the reconnect adds no second welcome on B.
  const welcomes = (await shown(b)).filter((m) => m.text === `欢迎小明进入${ROOM_NAME}房间~`);
  assert.equal(welcomes.length, 1);
  await waitOnline(a, 2);
  await waitOnline(b, 2);
  await shot(b, 'cluster-b-after-failover');
  await shot(a, 'cluster-a-after-failover');
  assert.deepEqual([...a.errors, ...b.errors].filter((e) => !e.includes('WebSocket')), []);
});

test('leaving: the other page shows the notice and the counts go down', async () => {
  assert.ok(a && b, 'needs the previous tests');
  await a.click('#back');
  await a.waitForSelector('#home:not([hidden])');
  await waitNotice(b, '小红离开房间');
  await waitOnline(b, 1);
  await roomCardCount(lobby, ROOM, 1);
  await roomCardCount(a, ROOM, 1);
  await shot(b, 'cluster-b-after-leave');
});
