'use strict';
// The Node comparison server: Socket.IO 4 with its Redis adapter, the counterpart of tests/load/sio_server.py.
//
// Set up the way Socket.IO's documentation describes for several servers behind one Redis: node-redis
// clients `pubClient` and `pubClient.duplicate()`, `createAdapter(pubClient, subClient)` from
// @socket.io/redis-adapter. A client authenticates with `auth: {token: <JWT>}` and joins a room named after
// its `sub`; backends `POST /notify/:user` (emits to the room) and `POST /broadcast` (emits to everyone)
// with a publisher JWT, like the service's publish API. Plain `http`, so nothing but Socket.IO sits in the path.
// Rooms as topics: a client emits `join` with a room's name and an ack, the handler calls `socket.join(room)`
// and acknowledges `{ok: true}`; `POST /topics/:room` does `io.to(room).emit(...)`.
//
//     BENCH_SECRET=... node tests/load/node/server.js --port 8002 --redis redis://127.0.0.1:6390/0 --channel bench

const http = require('node:http');

const { createClient } = require('redis');
const { Server } = require('socket.io');
const { createAdapter } = require('@socket.io/redis-adapter');

const { decodePath, denied, parseNotification, readBody, send, serverOptions, verifier } = require('./common');

function handler(io, verify) {
  async function publish(req, res, emit) {
    const refusal = denied(req, verify);
    if (refusal) return send(res, ...refusal);
    const body = parseNotification(await readBody(req));
    if (body === null) return send(res, 422, '{"error":"invalid_request"}');
    const ts = Date.now();
    emit(body, ts);
    return send(res, 202, JSON.stringify({ ts }));
  }

  return async (req, res) => {
    const path = (req.url || '/').split('?', 1)[0];
    if (path.startsWith('/notify/')) {
      if (req.method !== 'POST') return send(res, 405, 'Method Not Allowed', 'text/plain; charset=utf-8');
      const user = decodePath(path.slice('/notify/'.length));
      return publish(req, res, (body, ts) => {
        io.to(user).emit('notification', { event: body.event, data: body.data ?? null, ts });
      });
    }
    if (path === '/broadcast') {
      if (req.method !== 'POST') return send(res, 405, 'Method Not Allowed', 'text/plain; charset=utf-8');
      return publish(req, res, (body, ts) => {
        io.emit('notification', { event: body.event, data: body.data ?? null, ts, broadcast: true });
      });
    }
    if (path.startsWith('/topics/')) {
      if (req.method !== 'POST') return send(res, 405, 'Method Not Allowed', 'text/plain; charset=utf-8');
      const room = decodePath(path.slice('/topics/'.length));
      return publish(req, res, (body, ts) => {
        io.to(room).emit('notification', { topic: room, event: body.event, data: body.data ?? null, ts });
      });
    }
    if (path === '/healthz' && (req.method === 'GET' || req.method === 'HEAD')) {
      return send(res, 200, '{"status":"ok"}');
    }
    return send(res, 404, 'Not Found', 'text/plain; charset=utf-8');
  };
}

async function main() {
  const values = serverOptions('server.js', 'socketio');
  const verify = verifier(values.secret);

  const pubClient = createClient({ url: values.redis });
  const subClient = pubClient.duplicate();
  // node-redis throws an unhandled 'error' event otherwise; it reconnects by itself, as redis-py does.
  for (const client of [pubClient, subClient]) client.on('error', (err) => console.error('redis:', err.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);

  // Socket.IO takes over the request listeners present when it attaches (it answers /socket.io/ itself and
  // hands every other request on), so this one must exist before `io` does, and finds its handler later.
  let handle = null;
  const httpServer = http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      console.error(err);
      if (!res.headersSent) send(res, 500, 'Internal Server Error', 'text/plain; charset=utf-8');
    });
  });
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient, { key: values.channel }),
    perMessageDeflate: false, // as the service and the python server: compression off
    serveClient: false,
  });
  handle = handler(io, verify);
  io.use((socket, next) => {
    const auth = socket.handshake.auth;
    let claims;
    try {
      claims = verify(auth && typeof auth === 'object' ? auth.token : undefined);
    } catch {
      return next(new Error('invalid token'));
    }
    if (typeof claims.sub !== 'string' || !claims.sub) return next(new Error('token lacks sub'));
    // Joined before the CONNECT ack, as the python server does; a refused or closed socket leaves its rooms.
    socket.join(claims.sub);
    return next();
  });
  io.on('connection', (socket) => {
    socket.on('join', (room, ack) => {
      if (typeof ack !== 'function') return;
      if (typeof room !== 'string' || room.length === 0 || room.length > 200) {
        return ack({ ok: false, error: 'invalid room' });
      }
      socket.join(room);
      return ack({ ok: true });
    });
  });
  httpServer.listen(Number(values.port), '127.0.0.1');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
