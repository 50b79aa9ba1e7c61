// client.js against a scripted fake gateway (fake-gateway.mjs), in node: fast checks of the
// reconnect, resume, de-duplication, ack and resend logic. No browser, no Rust server.
import { test, before, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WebSocket } from 'ws';
import { FakeGateway, STATIC_DIR, fakeToken } from './fake-gateway.mjs';
import { waitFor } from './helpers.mjs';

// client.js is an ES module in a folder without package.json: load a copy named .mjs.
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-client-'));
fs.copyFileSync(path.join(STATIC_DIR, 'client.js'), path.join(tmp, 'client.mjs'));
const {
  ChatClient, compareIds, parseId, maxId, STATES, decodeJwtPayload,
} = await import(path.join(tmp, 'client.mjs'));

let fake;
const clients = [];

before(async () => {
  fake = await new FakeGateway().start();
});
after(async () => {
  await fake.stop();
  fs.rmSync(tmp, { recursive: true, force: true });
});
afterEach(() => {
  while (clients.length) clients.pop().close();
});

function client(userId, opts = {}) {
  const c = new ChatClient({
    url: fake.wsUrl, userId, userName: `name-${userId}`, WebSocket, backoffInitialMs: 50,
    backoffMaxMs: 400, ...opts,
  });
  const seen = [];
  c.on('message', (m) => seen.push(m));
  c.seen = seen;
  const confirmed = [];
  c.on('confirmed', (p) => confirmed.push(p));
  c.confirmed = confirmed;
  const states = [];
  c.on('state', (s) => states.push(s));
  c.states = states;
  clients.push(c);
  return c;
}

async function joined(c, roomId) {
  await waitFor(`${c.userId} joined ${roomId}`, () => c.rooms.get(String(roomId))?.joined);
}

let roomSeq = 0;
const newRoom = () => `room-${++roomSeq}`;

test('ids compare numerically by (ms, seq), not as strings', () => {
  assert.deepEqual(parseId('1732550000000-10'), [1732550000000, 10]);
  assert.deepEqual(parseId('0'), [0, 0]);
  assert.ok(compareIds('1732550000000-10', '1732550000000-9') > 0);
  assert.ok(compareIds('999-0', '1000-0') < 0);
  assert.ok(compareIds('1000-0', '1000-0') === 0);
  assert.ok(compareIds(null, '0-1') < 0);
  assert.equal(maxId('5-2', '5-10'), '5-10');
  assert.equal(maxId(null, '5-10'), '5-10');
});

test('chat both ways; own message confirmed by its copy, shown once', async () => {
  const room = newRoom();
  const a = client('a1').connect();
  const b = client('b1').connect();
  a.join(room, 'R');
  b.join(room, 'R');
  await joined(a, room);
  await joined(b, room);
  await waitFor('num 2', () => a.num(room) === 2);
  const p = a.send(room, '你好 👋');
  assert.equal(p.status, 'sending');
  const id = await p.promise;
  assert.equal(p.status, 'sent');
  assert.equal(a.seen.length, 0, 'own pending message is confirmed, not emitted again');
  await waitFor('b got it', () => b.seen.length === 1);
  assert.equal(b.seen[0].id, id);
  assert.equal(b.seen[0].content, '你好 👋');
  assert.equal(b.seen[0].own, false);
  b.send(room, 'back');
  await waitFor('a got reply', () => a.seen.length === 1);
  assert.equal(a.seen[0].content, 'back');
});

test('acks are cumulative and coalesced', async () => {
  const room = newRoom();
  const a = client('a2', { ackDelayMs: 100, ackEvery: 1000 }).connect();
  a.join(room);
  await joined(a, room);
  const before = fake.framesOf('ack').length;
  const ids = [];
  for (let i = 0; i < 20; i += 1) ids.push(fake.inject(room, 'other', `m${i}`).id);
  await waitFor('20 messages', () => a.seen.length === 20);
  await waitFor('ack of the last id', () => fake.framesOf('ack').some((f) => f.id === ids[19]));
  const acks = fake.framesOf('ack').slice(before);
  assert.ok(acks.length <= 3, `coalesced acks, got ${acks.length}`);
  assert.ok(fake.framesOf('login').some((f) => f.userId === 'a2' && f.ack === true));
});

test('a redelivered message is not shown again but acknowledged again', async () => {
  const room = newRoom();
  const a = client('a11', { ackDelayMs: 20 }).connect();
  a.join(room);
  await joined(a, room);
  const m = fake.inject(room, 'other', 'once');
  await waitFor('ack', () => fake.framesOf('ack').some((f) => f.id === m.id));
  const acks = () => fake.framesOf('ack').filter((f) => f.id === m.id).length;
  const before = acks();
  for (const c of fake.conns) fake.send(c, m); // the server's redelivery
  await waitFor('acked again', () => acks() > before);
  assert.equal(a.seen.length, 1);
});

test('reconnect resumes with lastId: messages sent meanwhile arrive once, in order', async () => {
  const room = newRoom();
  const a = client('a3').connect();
  a.join(room);
  await joined(a, room);
  fake.inject(room, 'other', 'before');
  await waitFor('first', () => a.seen.length === 1);
  fake.freeze(true); // the node stalls ...
  const missed = [fake.inject(room, 'other', 'm1', { silent: true }),
    fake.inject(room, 'other', 'm2', { silent: true })];
  fake.freeze(false);
  fake.closeAll(1012); // ... and goes away
  await waitFor('reconnecting', () => a.states.includes(STATES.RECONNECTING));
  await waitFor('connected again', () => a.state === STATES.CONNECTED && a.rooms.get(room).joined);
  await waitFor('missed messages', () => a.seen.length === 3);
  assert.deepEqual(a.seen.map((m) => m.content), ['before', 'm1', 'm2']);
  assert.equal(a.seen[1].id, missed[0].id);
  const logins = fake.framesOf('login').filter((f) => f.userId === 'a3');
  assert.equal(logins.at(-1).lastId, a.seen[0].id, 'resumed from the last id seen');
  // The server replays the same message again (e.g. redelivery): it is dropped.
  fake.closeAll(4009);
  await waitFor('reconnected', () => a.rooms.get(room).joined);
  fake.inject(room, 'other', 'after');
  await waitFor('after', () => a.seen.length === 4);
  assert.deepEqual(a.seen.map((m) => m.content), ['before', 'm1', 'm2', 'after']);
});

test('an unconfirmed message is re-sent with the same clientMsgId and stored once', async () => {
  const room = newRoom();
  const a = client('a4').connect();
  const b = client('b4').connect();
  a.join(room);
  b.join(room);
  await joined(a, room);
  await joined(b, room);
  fake.freeze(true); // the frame reaches a dead node: never processed
  const p = a.send(room, 'lost?');
  await waitFor('frame arrived', () => fake.received.some((r) => r.frame.clientMsgId === p.clientMsgId));
  fake.terminateAll();
  fake.freeze(false);
  assert.equal(p.status, 'sending');
  await p.promise;
  const stored = fake.messages(room).filter((m) => m.clientMsgId === p.clientMsgId);
  assert.equal(stored.length, 1);
  await waitFor('b sees it', () => b.seen.some((m) => m.clientMsgId === p.clientMsgId));
  fake.inject(room, 'other', 'barrier');
  await waitFor('barrier', () => a.seen.some((m) => m.content === 'barrier')
    && b.seen.some((m) => m.content === 'barrier'));
  assert.equal(b.seen.filter((m) => m.clientMsgId === p.clientMsgId).length, 1);
  assert.equal(a.seen.filter((m) => m.clientMsgId === p.clientMsgId).length, 0);
});

test('stored but unconfirmed before a drop: confirmed once after the reconnect, not shown twice', async () => {
  const room = newRoom();
  const a = client('a5').connect();
  a.join(room);
  await joined(a, room);
  fake.inject(room, 'other', 'first');
  await waitFor('first', () => a.seen.length === 1);
  // The server stores the message, but the connection dies before the copy reaches the client.
  const realSend = fake.send.bind(fake);
  let dropCopies = true;
  fake.send = (conn, frame) => {
    if (dropCopies && frame.event === 'message' && frame.userId === 'a5') return;
    realSend(conn, frame);
  };
  const p = a.send(room, 'stored once');
  await waitFor('stored', () => fake.messages(room).some((m) => m.clientMsgId === p.clientMsgId));
  dropCopies = false;
  fake.send = realSend;
  fake.terminateAll();
  const id = await p.promise;
  assert.equal(id, fake.messages(room).find((m) => m.clientMsgId === p.clientMsgId).id);
  assert.equal(fake.messages(room).filter((m) => m.clientMsgId === p.clientMsgId).length, 1);
  fake.inject(room, 'other', 'barrier');
  await waitFor('barrier', () => a.seen.some((m) => m.content === 'barrier'));
  assert.deepEqual(a.seen.map((m) => m.content), ['first', 'barrier']);
  assert.equal(a.confirmed.filter((c) => c.clientMsgId === p.clientMsgId).length, 1);
});

test('no confirmation in time: re-sent on the same connection, the duplicate answer confirms', async () => {
  const room = newRoom();
  const a = client('a10', { resendAfterMs: 300 }).connect();
  a.join(room);
  await joined(a, room);
  const realSend = fake.send.bind(fake);
  fake.send = (conn, frame) => {
    if (frame.event === 'message' && frame.userId === 'a10') return; // the copy gets lost
    realSend(conn, frame);
  };
  try {
    const p = a.send(room, 'once');
    const id = await p.promise;
    const tries = fake.received.filter((r) => r.frame.clientMsgId === p.clientMsgId);
    assert.ok(tries.length >= 2, 'sent again');
    assert.equal(new Set(tries.map((r) => r.conn)).size, 1, 'on the same connection');
    assert.equal(fake.messages(room).filter((m) => m.clientMsgId === p.clientMsgId).length, 1);
    assert.equal(id, fake.messages(room).at(-1).id);
  } finally {
    fake.send = realSend;
  }
});

test('replay pages: synced with more=true is followed by sync until done', async () => {
  fake.pageSize = 3;
  try {
    const room = newRoom();
    const a = client('a6').connect();
    a.join(room);
    await joined(a, room);
    fake.inject(room, 'other', 'm0');
    await waitFor('m0', () => a.seen.length === 1);
    fake.freeze(true);
    for (let i = 1; i <= 10; i += 1) fake.inject(room, 'other', `m${i}`, { silent: true });
    fake.freeze(false);
    fake.closeAll(1012);
    await waitFor('all 11', () => a.seen.length === 11);
    assert.deepEqual(a.seen.map((m) => m.content), Array.from({ length: 11 }, (_, i) => `m${i}`));
    assert.ok(fake.framesOf('sync').filter((f) => f.roomId === room).length >= 3);
    assert.ok(a.seen.slice(1).every((m) => m.replayed));
  } finally {
    fake.pageSize = 1000;
  }
});

test('heartbeat: no answer within the pong timeout reconnects', async () => {
  const room = newRoom();
  const a = client('a7', { heartbeatMs: 100, pongTimeoutMs: 150 }).connect();
  a.join(room);
  await joined(a, room);
  await waitFor('a ping', () => fake.framesOf('heartBeat').length > 0);
  fake.freeze(true);
  try {
    await waitFor('reconnecting after pong timeout', () => a.states.includes(STATES.RECONNECTING), 3000);
  } finally {
    fake.freeze(false);
  }
  await waitFor('connected', () => a.state === STATES.CONNECTED && a.rooms.get(room).joined);
});

test('backoff: reconnecting, then offline, then connected when the server is back', async () => {
  const port = fake.port;
  const a = client('a8', { backoffInitialMs: 20, backoffMaxMs: 80, offlineAfterAttempts: 3 }).connect();
  const room = newRoom();
  a.join(room);
  await joined(a, room);
  await fake.stop();
  try {
    await waitFor('offline', () => a.state === STATES.OFFLINE, 5000);
    assert.ok(a.states.includes(STATES.RECONNECTING));
    const p = a.send(room, 'queued while offline');
    assert.equal(p.status, 'sending');
    fake = await new FakeGateway().start(port);
    await p.promise;
    assert.equal(a.state, STATES.CONNECTED);
    assert.equal(fake.messages(room).length, 1);
  } finally {
    if (!fake.http?.listening) fake = await new FakeGateway().start();
  }
});

test('a node that refuses at once (1013) keeps the client backing off', async () => {
  const room = newRoom();
  const a = client('a12', { backoffInitialMs: 40, backoffMaxMs: 2000, offlineAfterAttempts: 4 }).connect();
  a.join(room);
  await joined(a, room);
  fake.rejectWith = 1013;
  fake.rejected = 0;
  try {
    const started = Date.now();
    fake.closeAll(1012);
    await waitFor('offline after 4 refusals', () => a.state === STATES.OFFLINE, 10000);
    // Growing waits (~40·2ⁿ, jittered to at least half), not a tight loop.
    assert.ok(fake.rejected <= 5, `refused ${fake.rejected} times`);
    assert.ok(Date.now() - started >= 150, `${Date.now() - started} ms`);
  } finally {
    fake.rejectWith = null;
  }
  await waitFor('back', () => a.state === STATES.CONNECTED && a.rooms.get(room).joined, 10000);
});

test('leave sends logout and forgets the room; a bad frame fails the message', async () => {
  const room = newRoom();
  const a = client('a9').connect();
  const b = client('b9').connect();
  a.join(room);
  b.join(room);
  await joined(a, room);
  await joined(b, room);
  const left = [];
  b.on('logout', (f) => left.push(f));
  a.leave(room);
  await waitFor('logout seen by b', () => left.length === 1);
  assert.equal(left[0].userId, 'a9');
  assert.equal(b.num(room), 1);
  assert.throws(() => a.send(room, 'x'), /join room/);
  const big = b.send(room, 'x'.repeat(70000));
  assert.equal(big.status, 'failed');
  await assert.rejects(big.promise, /too long/);
});

// ---- tokens ----------------------------------------------------------------------------

const nowSecs = () => Math.floor(Date.now() / 1000);

function tokenClient(token, opts = {}) {
  const c = new ChatClient({
    url: fake.wsUrl, WebSocket, token, backoffInitialMs: 50, backoffMaxMs: 400, ...opts,
  });
  c.seen = [];
  c.on('message', (m) => c.seen.push(m));
  c.states = [];
  c.on('state', (s) => c.states.push(s));
  c.errors = [];
  c.on('error', (f) => c.errors.push(f));
  c.refreshedFrames = [];
  c.on('refreshed', (f) => c.refreshedFrames.push(f));
  clients.push(c);
  return c;
}

test('a token: userId and userName from its claims, sent in every login, also after a reconnect', async () => {
  const token = fakeToken({ sub: 'tok-1', name: '小红 🌸', exp: nowSecs() + 3600 });
  assert.equal(decodeJwtPayload(token).name, '小红 🌸', 'base64url and UTF-8 decoded');
  assert.equal(decodeJwtPayload('not.a.jwt'), null);
  assert.throws(() => new ChatClient({ url: fake.wsUrl, WebSocket, token, userId: 'someone-else' }), /sub/);
  const room = newRoom();
  const c = tokenClient(token).connect();
  assert.equal(c.userId, 'tok-1');
  assert.equal(c.userName, '小红 🌸');
  c.join(room, 'R');
  await joined(c, room);
  const logins = () => fake.framesOf('login').filter((f) => f.userId === 'tok-1');
  assert.equal(logins().length, 1);
  assert.equal(logins()[0].token, token);
  fake.closeAll(1012);
  await waitFor('re-login', () => logins().length === 2);
  assert.equal(logins()[1].token, token);
  await joined(c, room);
  assert.equal(fake.framesOf('refresh').length, 0, 'no refresh for a long-lived token yet');
});

test('refreshToken: a refresh frame before expiry keeps the connection past the first exp', async () => {
  const room = newRoom();
  const minted = [];
  const mint = (ttl) => {
    const t = fakeToken({ sub: 'tok-2', name: 'R', exp: nowSecs() + ttl });
    minted.push(t);
    return t;
  };
  const c = tokenClient(mint(3), {
    refreshToken: async () => mint(3),
  }).connect();
  c.join(room);
  await joined(c, room);
  const firstExp = c.tokenExp;
  // The fake closes with 4001 at exp (leeway 0): survive well past it.
  await waitFor('two refreshes, 1 s past the first exp', () => c.refreshedFrames.length >= 2
    && Date.now() / 1000 > firstExp + 1, 10000);
  assert.equal(c.state, STATES.CONNECTED);
  assert.ok(!c.states.includes(STATES.RECONNECTING), `states: ${c.states}`);
  const refreshes = fake.framesOf('refresh');
  assert.ok(refreshes.length >= 2);
  assert.ok(refreshes.every((f) => minted.includes(f.token) && f.token !== minted[0]));
  assert.ok(c.tokenExp >= firstExp);
  assert.equal(c.refreshedFrames.at(-1).exp, c.tokenExp);
  // Still chatting on the same connection.
  const p = c.send(room, 'still here');
  await p.promise;
});

test('close 4001 with refreshToken: a new token, then a reconnect that logs in with it', async () => {
  const room = newRoom();
  let n = 0;
  const c = tokenClient(fakeToken({ sub: 'tok-3', exp: nowSecs() + 3600 }), {
    refreshToken: async () => fakeToken({ sub: 'tok-3', exp: nowSecs() + 3600 + (n += 1) }),
  }).connect();
  c.join(room);
  await joined(c, room);
  const before = c.token;
  fake.closeAll(4001); // as if the token had expired on the server
  await waitFor('re-login with a new token', () => fake.framesOf('login')
    .some((f) => f.userId === 'tok-3' && f.token !== before));
  await joined(c, room);
  assert.equal(n, 1, 'refreshToken called once');
  assert.equal(c.state, STATES.CONNECTED);
});

test('close 4001 without refreshToken: state unauthorized, an error, no reconnect; setToken resumes', async () => {
  const room = newRoom();
  const c = tokenClient(fakeToken({ sub: 'tok-4', exp: nowSecs() + 3600 })).connect();
  c.join(room);
  await joined(c, room);
  const conns = fake.connSeq;
  fake.closeAll(4001);
  await waitFor('unauthorized', () => c.state === STATES.UNAUTHORIZED);
  assert.ok(c.errors.some((e) => e.code === 'unauthorized' && e.reason === 'expired'), JSON.stringify(c.errors));
  await new Promise((r) => setTimeout(r, 600)); // more than the maximum backoff
  assert.equal(fake.connSeq, conns, 'no reconnect');
  const fresh = fakeToken({ sub: 'tok-4', exp: nowSecs() + 7200 });
  assert.equal(c.setToken(fakeToken({ sub: 'other', exp: nowSecs() + 7200 })), false, 'a token for another user');
  assert.equal(c.setToken(fresh), true);
  await waitFor('connected again', () => c.state === STATES.CONNECTED);
  await waitFor('re-login with the new token', () => fake.framesOf('login').some((f) => f.token === fresh));
  await joined(c, room);
});

test('a login refused as expired: refreshToken, then the room is joined with the new token', async () => {
  const room = newRoom();
  const expired = fakeToken({ sub: 'tok-5', exp: nowSecs() + 1 });
  const fresh = fakeToken({ sub: 'tok-5', exp: nowSecs() + 3600 });
  let calls = 0;
  const c = tokenClient(expired, {
    refreshToken: async () => { calls += 1; return fresh; },
  });
  // Our clock would refresh before connecting; pretend it is behind the server's by 2 s so
  // the expired token is sent and the gateway's answer has to trigger the refresh.
  c.clockOffset = -2000;
  await new Promise((r) => setTimeout(r, 1100)); // the token is now expired on the server
  c.connect();
  c.join(room);
  await joined(c, room);
  assert.equal(calls, 1);
  const logins = fake.framesOf('login').filter((f) => f.userId === 'tok-5');
  assert.deepEqual(logins.map((f) => f.token), [expired, fresh]);
  assert.ok(c.errors.some((e) => e.code === 'unauthorized' && e.reason === 'expired'));
});
