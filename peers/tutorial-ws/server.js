// The tutorial's chat room server, for the benchmark suite (`loadgen suite --only peers`).
//
// Same protocol as the tutorial (docs: /work/shared/tutorial.txt, summarised in
// docs/benchmarks.md): JSON text frames on a bare path; the first frame carrying a `roomId`
// puts the connection into that room; every frame except a heartbeat is sent to the whole
// room (the sender included) with `num`, the room's connection count, added; a `login` frame
// is remembered and, when the connection closes, the rest of the room gets it back as
// `event: "logout"`; `{"event":"heartBeat","content":"ping"}` is answered with `pong` to the
// sender only.
//
// Differences from the tutorial's code, all of them fixes that do not change the protocol:
// a frame that is not JSON is ignored (the tutorial crashes), a connection silent for
// IDLE_TIMEOUT_MS is closed (the tutorial never reaps), a room's members are kept in a Set
// (the tutorial scans every connection of the server per message), and a broadcast frame is
// serialised once (the tutorial stringifies it once per recipient).
//
// Usage: PORT=9000 node server.js   (prints "listening <port>" once it accepts connections)
'use strict';

const { WebSocketServer } = require('ws');

const PORT = Number(process.env.PORT || 3000);
const HOST = process.env.HOST || '127.0.0.1';
const IDLE_TIMEOUT_MS = Number(process.env.IDLE_TIMEOUT_MS || 60000);

/** roomId (as a string) -> Set of the room's connections. */
const rooms = new Map();

const wss = new WebSocketServer({
  host: HOST,
  port: PORT,
  maxPayload: 64 * 1024,
  perMessageDeflate: false,
  clientTracking: true,
});

function broadcast(room, text, except) {
  const members = rooms.get(room);
  if (!members) return;
  for (const client of members) {
    if (client !== except && client.readyState === client.OPEN) client.send(text);
  }
}

function join(ws, roomId) {
  ws.room = String(roomId);
  let members = rooms.get(ws.room);
  if (!members) {
    members = new Set();
    rooms.set(ws.room, members);
  }
  members.add(ws);
}

function leave(ws) {
  const members = rooms.get(ws.room);
  if (!members) return 0;
  members.delete(ws);
  if (members.size === 0) rooms.delete(ws.room);
  return members.size;
}

wss.on('connection', (ws) => {
  ws.room = undefined;
  ws.enterInfo = undefined;
  ws.lastSeen = Date.now();

  ws.on('message', (raw, isBinary) => {
    ws.lastSeen = Date.now();
    if (isBinary) return;
    let data;
    try {
      data = JSON.parse(raw.toString());
    } catch {
      return;
    }
    if (data === null || typeof data !== 'object') return;
    if (data.event === 'heartBeat' && data.content === 'ping') {
      ws.send('{"event":"heartBeat","content":"pong"}');
      return;
    }
    if (data.event === 'login') ws.enterInfo = data;
    if (ws.room === undefined && data.roomId !== undefined && data.roomId !== null) {
      join(ws, data.roomId);
    }
    if (ws.room === undefined) return;
    data.num = rooms.get(ws.room).size;
    broadcast(ws.room, JSON.stringify(data));
  });

  ws.on('close', () => {
    if (ws.room === undefined) return;
    const num = leave(ws);
    if (num > 0) broadcast(ws.room, JSON.stringify({ ...ws.enterInfo, event: 'logout', num }));
  });

  ws.on('error', () => {});
});

// Close connections that sent nothing (not even a heartbeat) for IDLE_TIMEOUT_MS.
const reaper = setInterval(() => {
  const cutoff = Date.now() - IDLE_TIMEOUT_MS;
  for (const ws of wss.clients) {
    if (ws.lastSeen < cutoff) ws.terminate();
  }
}, Math.max(1000, IDLE_TIMEOUT_MS / 2));
reaper.unref();

wss.on('listening', () => {
  console.log(`listening ${wss.address().port}`);
});

function shutdown() {
  for (const ws of wss.clients) ws.terminate();
  wss.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
