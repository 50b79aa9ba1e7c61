// A scripted stand-in for the gateway, for testing client.js and the page without the Rust
// server: serves gateway/static and speaks a small subset of docs/protocol.md (login with
// ack/lastId replay and paging, chat with clientMsgId de-duplication, ack, sync, logout,
// heartBeat, and tokens: a login's `token` and the `refresh` frame, with the close 4001 at
// the token's `exp`; signatures are not checked). Tests can drop connections, freeze the
// server, and inspect what it received.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';

const here = path.dirname(fileURLToPath(import.meta.url));
export const STATIC_DIR = path.resolve(here, '../../gateway/static');
const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};

export class FakeGateway {
  constructor({ pageSize = 1000, defaultRooms = [{ roomId: 1, roomName: 'Lobby' }] } = {}) {
    this.pageSize = pageSize;
    this.defaultRooms = defaultRooms;
    this.rooms = new Map(); // key -> { name, messages: [], members: Map(userId -> Set(conn)) }
    this.dedup = new Map(); // user|room|clientMsgId -> id
    this.conns = new Set();
    this.received = []; // every frame from every client: { conn, frame }
    this.frozen = false;
    this.lastMs = 0;
    this.lastSeq = 0;
    this.connSeq = 0;
  }

  async start(port = 0) {
    this.http = http.createServer((req, res) => this.serveHttp(req, res));
    this.wss = new WebSocketServer({ noServer: true });
    this.http.on('upgrade', (req, socket, head) => {
      this.wss.handleUpgrade(req, socket, head, (ws) => this.onConnection(ws));
    });
    await new Promise((resolve) => this.http.listen(port, '127.0.0.1', resolve));
    this.port = this.http.address().port;
    this.url = `http://127.0.0.1:${this.port}`;
    this.wsUrl = `ws://127.0.0.1:${this.port}/ws`;
    return this;
  }

  async stop() {
    for (const c of this.conns) c.ws.terminate();
    this.wss?.close();
    await new Promise((resolve) => (this.http ? this.http.close(() => resolve()) : resolve()));
  }

  serveHttp(req, res) {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/api/rooms') {
      const rooms = new Map();
      for (const r of this.defaultRooms) rooms.set(String(r.roomId), { ...r, num: 0 });
      for (const [key, room] of this.rooms) {
        rooms.set(key, { roomId: room.roomId, roomName: room.name, num: room.members.size });
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ rooms: [...rooms.values()] }));
      return;
    }
    const members = url.pathname.match(/^\/api\/rooms\/([^/]+)\/members$/);
    if (members) {
      const key = decodeURIComponent(members[1]);
      const room = this.rooms.get(key);
      const list = room ? [...room.members.entries()].map(([userId, set]) => ({
        userId, userName: [...set][0].userName,
      })) : [];
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ roomId: room ? room.roomId : key, num: list.length, members: list, nextCursor: null }));
      return;
    }
    const file = url.pathname === '/' ? 'index.html' : url.pathname.slice(1);
    const full = path.join(STATIC_DIR, path.basename(file));
    if (!TYPES[path.extname(full)] || !fs.existsSync(full)) {
      res.writeHead(404);
      res.end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[path.extname(full)], 'cache-control': 'no-cache' });
    res.end(fs.readFileSync(full));
  }

  // ---- controls for tests ----

  /** Closes every connection with `code` (1012 = service restart). */
  closeAll(code = 1012) {
    for (const c of this.conns) {
      c.dead = true;
      c.ws.close(code, 'test');
    }
  }

  /** Cuts every connection without a close frame (like a killed node). */
  terminateAll() {
    for (const c of this.conns) {
      c.dead = true;
      c.ws.terminate();
    }
  }

  /**
   * While frozen, frames are read but neither answered nor processed (a stalled node); on
   * thaw the frames of connections still open are processed in order, those of closed ones
   * are lost (as with a node that is killed while stalled).
   */
  freeze(on = true) {
    this.frozen = on;
    if (on) return;
    for (const conn of this.conns) {
      if (conn.dead) continue;
      const queued = conn.queued ?? [];
      conn.queued = [];
      for (const frame of queued) this.handle(conn, frame);
    }
  }

  framesOf(event) {
    return this.received.filter((r) => (r.frame.event ?? 'message') === event).map((r) => r.frame);
  }

  messages(roomId) {
    return this.rooms.get(String(roomId))?.messages ?? [];
  }

  /** Stores a chat message as if another user had sent it (delivered to live members). */
  inject(roomId, userId, content, extra = {}) {
    const room = this.room(roomId, String(roomId));
    return this.publish(room, roomId, { userId, userName: userId }, content, extra);
  }

  // ---- protocol ----

  nextId() {
    const ms = Date.now();
    if (ms <= this.lastMs) this.lastSeq += 1;
    else {
      this.lastMs = ms;
      this.lastSeq = 0;
    }
    return `${this.lastMs}-${this.lastSeq}`;
  }

  room(roomId, name) {
    const key = String(roomId);
    if (!this.rooms.has(key)) {
      this.rooms.set(key, { roomId, name: name ?? key, messages: [], members: new Map() });
    }
    return this.rooms.get(key);
  }

  onConnection(ws) {
    if (this.rejectWith) {
      ws.close(this.rejectWith, 'full');
      this.rejected = (this.rejected ?? 0) + 1;
      return;
    }
    const conn = { ws, id: ++this.connSeq, userId: null, userName: null, rooms: new Map() };
    this.conns.add(conn);
    ws.on('message', (data) => {
      let frame;
      try {
        frame = JSON.parse(String(data));
      } catch {
        this.send(conn, { event: 'error', code: 'bad_json', message: 'bad json' });
        return;
      }
      this.received.push({ conn: conn.id, frame });
      if (this.frozen) {
        conn.queued = conn.queued ?? [];
        conn.queued.push(frame);
        return;
      }
      this.handle(conn, frame);
    });
    ws.on('close', () => {
      clearTimeout(conn.expiryTimer);
      this.conns.delete(conn);
      for (const key of [...conn.rooms.keys()]) this.leave(conn, key);
    });
  }

  send(conn, frame) {
    if (conn.ws.readyState === 1) conn.ws.send(JSON.stringify(frame));
  }

  handle(conn, f) {
    const event = f.event ?? 'message';
    switch (event) {
      case 'heartBeat':
        return this.send(conn, { event: 'heartBeat', content: 'pong' });
      case 'login':
        return this.login(conn, f);
      case 'refresh':
        return this.refresh(conn, f);
      case 'logout':
        return this.leave(conn, String(f.roomId));
      case 'message':
        return this.chat(conn, f);
      case 'ack':
        return undefined;
      case 'sync':
        return this.page(conn, f.roomId, f.since, f.limit);
      default:
        return this.send(conn, { event: 'error', code: 'unknown_event', message: event });
    }
  }

  /** Claims of an unexpired token, or an error frame's fields. */
  checkToken(token) {
    const claims = decodeToken(token);
    if (!claims || typeof claims.sub !== 'string') return { error: 'malformed' };
    if (typeof claims.exp === 'number' && claims.exp * 1000 <= Date.now()) return { error: 'expired' };
    return { claims };
  }

  /** Closes the connection with 4001 at the token's exp (like the gateway with leeway 0). */
  armExpiry(conn, claims) {
    clearTimeout(conn.expiryTimer);
    if (typeof claims.exp !== 'number') return;
    conn.expiryTimer = setTimeout(() => {
      conn.dead = true;
      conn.ws.close(4001, 'token expired');
    }, claims.exp * 1000 - Date.now());
  }

  refresh(conn, f) {
    const { claims, error } = this.checkToken(f.token);
    if (error || (conn.userId && claims.sub !== conn.userId)) {
      return this.send(conn, {
        event: 'error', code: 'unauthorized', reason: error ?? 'user_mismatch', message: 'refresh refused',
      });
    }
    this.armExpiry(conn, claims);
    return this.send(conn, { event: 'refreshed', exp: claims.exp });
  }

  login(conn, f) {
    if (f.token !== undefined) {
      const { claims, error } = this.checkToken(f.token);
      if (error) {
        return this.send(conn, {
          event: 'error', code: 'unauthorized', reason: error, roomId: f.roomId, message: 'login refused',
        });
      }
      conn.userId = conn.userId ?? claims.sub;
      conn.tokenName = claims.name;
      this.armExpiry(conn, claims);
    }
    conn.userId = conn.userId ?? String(f.userId);
    conn.userName = conn.tokenName ?? f.userName ?? conn.userId;
    const room = this.room(f.roomId, f.roomName);
    const key = String(f.roomId);
    const already = conn.rooms.has(key);
    conn.rooms.set(key, { roomId: f.roomId, paging: false });
    let set = room.members.get(conn.userId);
    const first = !set;
    if (!set) room.members.set(conn.userId, (set = new Set()));
    set.add(conn);
    const frame = {
      event: 'login', userId: conn.userId, userName: conn.userName, roomId: f.roomId,
      roomName: room.name, num: room.members.size,
    };
    if (first && !already) this.broadcast(room, frame);
    else this.send(conn, frame);
    if (f.lastId) this.page(conn, f.roomId, f.lastId, this.pageSize);
  }

  page(conn, roomId, since, limit) {
    const key = String(roomId);
    const sub = conn.rooms.get(key);
    if (!sub) return this.send(conn, { event: 'error', code: 'not_in_room', roomId });
    const room = this.rooms.get(key);
    const after = room.messages.filter((m) => cmp(m.id, since ?? '0') > 0);
    const n = Math.min(limit ?? this.pageSize, this.pageSize);
    const page = after.slice(0, n);
    for (const m of page) this.send(conn, { ...m, roomId: sub.roomId });
    const more = after.length > n;
    sub.paging = more;
    this.send(conn, {
      event: 'synced', roomId: sub.roomId, lastId: page.length ? page[page.length - 1].id : since,
      count: page.length, truncated: false, more,
    });
  }

  chat(conn, f) {
    const key = String(f.roomId);
    if (!conn.rooms.has(key)) {
      return this.send(conn, {
        event: 'error', code: 'not_in_room', roomId: f.roomId, clientMsgId: f.clientMsgId,
      });
    }
    if (f.clientMsgId) {
      const dk = `${conn.userId}|${key}|${f.clientMsgId}`;
      if (this.dedup.has(dk)) {
        return this.send(conn, {
          event: 'sent', roomId: f.roomId, id: this.dedup.get(dk), clientMsgId: f.clientMsgId,
          duplicate: true,
        });
      }
    }
    return this.publish(this.rooms.get(key), f.roomId, conn, f.content, { clientMsgId: f.clientMsgId });
  }

  publish(room, roomId, who, content, extra = {}) {
    const id = this.nextId();
    const m = {
      event: 'message', id, roomId, roomName: room.name, userId: who.userId,
      userName: who.userName, content, ts: Date.now(), num: room.members.size,
    };
    if (extra.clientMsgId) {
      m.clientMsgId = extra.clientMsgId;
      this.dedup.set(`${who.userId}|${String(roomId)}|${extra.clientMsgId}`, id);
    }
    room.messages.push(m);
    if (!extra.silent) {
      for (const c of this.roomConns(room)) {
        const sub = c.rooms.get(String(roomId));
        if (!sub.paging) this.send(c, { ...m, roomId: sub.roomId });
      }
    }
    return m;
  }

  roomConns(room) {
    const out = [];
    for (const set of room.members.values()) out.push(...set);
    return out;
  }

  broadcast(room, frame) {
    for (const c of this.roomConns(room)) {
      const sub = c.rooms.get(String(frame.roomId));
      this.send(c, { ...frame, roomId: sub ? sub.roomId : frame.roomId });
    }
  }

  leave(conn, key) {
    if (!conn.rooms.delete(key)) return;
    const room = this.rooms.get(key);
    const set = room.members.get(conn.userId);
    set.delete(conn);
    if (set.size === 0) {
      room.members.delete(conn.userId);
      this.broadcast(room, {
        event: 'logout', userId: conn.userId, userName: conn.userName, roomId: room.roomId,
        roomName: room.name, num: room.members.size,
      });
    }
  }
}

/** The payload of a JWT (not verified). */
export function decodeToken(token) {
  try {
    return JSON.parse(Buffer.from(String(token).split('.')[1], 'base64url').toString('utf8'));
  } catch {
    return null;
  }
}

/** An unsigned-looking JWT for the fake (it checks no signature). */
export function fakeToken(claims) {
  const part = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
  return `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}.c2lnbmF0dXJl`;
}

function cmp(a, b) {
  const pa = String(a).split('-').map(Number);
  const pb = String(b).split('-').map(Number);
  return (pa[0] - pb[0]) || ((pa[1] ?? 0) - (pb[1] ?? 0));
}

// `node fake-gateway.mjs [port]` runs it by itself, for trying the page by hand.
if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const fake = await new FakeGateway().start(Number(process.argv[2] ?? 0));
  console.log(`fake gateway on ${fake.url}`);
}
