// The tutorial's chat room on Socket.IO 4.8 with @socket.io/redis-adapter, for the benchmark
// suite (`loadgen suite --only peers`): run several of these processes on one Redis and a room
// spans them all.
//
// Events (client -> server), payloads as in the tutorial's JSON frames:
//   login     {userId, userName, roomId, roomName}  joins the room (once per connection)
//   message   {roomId, content, ...}                to the whole room, the sender included
//   heartBeat {event:"heartBeat", content:"ping"}   answered with heartBeat pong to the sender
// Server -> room: `login`, `message` and `logout` events carrying the frame with `num` added,
// the room's connection count over every node (a Redis counter: INCR at login, DECR when a
// logged-in connection goes; `num` of a message is read from it, one GET per message).
//
// WebSocket transport only (no long polling, so no sticky sessions are needed), no
// compression. Usage: PORT=9001 REDIS_URL=redis://127.0.0.1:6390 node server.js
// (prints "listening <port>" once it accepts connections).
'use strict';

const { createServer } = require('node:http');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');
const { createClient } = require('redis');

const PORT = Number(process.env.PORT || 3000);
const HOST = process.env.HOST || '127.0.0.1';
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379';

const countKey = (room) => `num:${room}`;

async function main() {
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  pub.on('error', (e) => console.error('redis pub:', e.message));
  sub.on('error', (e) => console.error('redis sub:', e.message));
  await Promise.all([pub.connect(), sub.connect()]);

  const httpServer = createServer();
  const io = new Server(httpServer, {
    transports: ['websocket'],
    serveClient: false,
    perMessageDeflate: false,
    maxHttpBufferSize: 64 * 1024,
    adapter: createAdapter(pub, sub),
  });

  io.on('connection', (socket) => {
    let room;
    let info;

    socket.on('login', async (data) => {
      if (room !== undefined || data === null || typeof data !== 'object') return;
      if (data.roomId === undefined || data.roomId === null) return;
      room = String(data.roomId);
      info = data;
      socket.join(room);
      try {
        const num = await pub.incr(countKey(room));
        io.to(room).emit('login', { ...data, event: 'login', num });
      } catch (e) {
        console.error('login:', e.message);
      }
    });

    socket.on('message', async (data) => {
      if (room === undefined || data === null || typeof data !== 'object') return;
      try {
        const num = Number(await pub.get(countKey(room)));
        io.to(room).emit('message', { ...data, num });
      } catch (e) {
        console.error('message:', e.message);
      }
    });

    socket.on('heartBeat', () => {
      socket.emit('heartBeat', { event: 'heartBeat', content: 'pong' });
    });

    socket.on('disconnect', async () => {
      if (room === undefined) return;
      try {
        const num = await pub.decr(countKey(room));
        if (num > 0) io.to(room).emit('logout', { ...info, event: 'logout', num });
      } catch (e) {
        console.error('logout:', e.message);
      }
    });
  });

  httpServer.listen(PORT, HOST, () => {
    console.log(`listening ${httpServer.address().port}`);
  });

  const shutdown = () => {
    io.disconnectSockets(true);
    setTimeout(() => process.exit(0), 500).unref();
    io.close(() => process.exit(0));
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
