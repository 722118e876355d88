'use strict';
// The lean Node reference: `ws` and node-redis, no framework; the counterpart of tests/load/lean_server.py.
//
// A client opens `/ws?token=<JWT>` and gets a `welcome` frame; this process subscribes to the exact Redis
// channel of the token's `sub` while the user has a socket here, plus one broadcast channel. Backends
// `POST /notify/:user` and `POST /broadcast` (publisher JWT) encode the frame once and PUBLISH it; each
// process writes the bytes it receives to its sockets of that user. A verified publisher token is kept until
// its exp, as the service does. Topics at their simplest: `{"type":"join","topic":T}` (any name, anyone) adds
// the socket to T's set, subscribes T's channel with its first socket here and answers `joined`;
// `POST /topics/:T` publishes to that channel.
//
//     BENCH_SECRET=... node tests/load/node/lean.js --port 8004 --redis redis://127.0.0.1:6390/0 --channel bench

const http = require('node:http');

const { createClient } = require('redis');
const { WebSocketServer } = require('ws');

const { decodePath, denied, parseNotification, readBody, send, serverOptions, verifier } = require('./common');

async function main() {
  const values = serverOptions('lean.js', 'lean');
  const verify = verifier(values.secret);
  // Verified publisher tokens, kept until their exp as the service does (a real server would bound this).
  const publishers = new Map();
  const verifyPublisher = (token) => {
    let claims = publishers.get(token);
    if (claims === undefined || claims.exp * 1000 <= Date.now()) {
      claims = verify(token);
      publishers.set(token, claims);
    }
    return claims;
  };
  const prefix = `${values.channel}:u:`;
  const everyone = `${values.channel}:all`;
  const roomPrefix = `${values.channel}:t:`;

  const pub = createClient({ url: values.redis });
  const sub = pub.duplicate();
  for (const client of [pub, sub]) client.on('error', (err) => console.error('redis:', err.message));
  await Promise.all([pub.connect(), sub.connect()]);

  const sockets = new Map(); // user -> Set of this process's open sockets of that user
  const all = new Set();
  const rooms = new Map(); // topic -> Set of this process's sockets in it
  const roomReady = new Map(); // topic -> its channel's SUBSCRIBE
  const deliver = (targets) => (message) => {
    for (const ws of targets) ws.send(message, { binary: false });
  };
  await sub.subscribe(everyone, deliver(all), true);

  const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false });
  const pingSeconds = Number(process.env.BENCH_PING_INTERVAL || 0); // the keepalive, below
  const server = http.createServer((req, res) => {
    handle(req, res).catch((err) => {
      console.error(err);
      if (!res.headersSent) send(res, 500, '{"error":"internal"}');
    });
  });

  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url || '/', 'http://localhost');
    let user;
    try {
      user = url.pathname === '/ws' ? verify(url.searchParams.get('token') ?? undefined).sub : undefined;
    } catch {
      user = undefined;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      if (typeof user !== 'string' || !user) return ws.close(4401, 'invalid token');
      ws.send('{"type":"welcome"}');
      let mine = sockets.get(user);
      if (!mine) {
        mine = new Set();
        sockets.set(user, mine);
        sub.subscribe(prefix + user, deliver(mine), true).catch((err) => console.error('subscribe:', err.message));
      }
      mine.add(ws);
      all.add(ws);
      if (pingSeconds > 0) {
        ws.isAlive = true;
        ws.on('pong', () => {
          ws.isAlive = true;
        });
      }
      const joined = [];
      ws.on('message', (data, isBinary) => {
        if (!isBinary) join(ws, data.toString('utf8'), joined).catch((err) => console.error('join:', err.message));
      });
      ws.on('close', () => {
        for (const topic of joined) {
          const members = rooms.get(topic);
          if (!members) continue;
          members.delete(ws);
          if (members.size === 0) {
            rooms.delete(topic);
            roomReady.delete(topic);
            sub.unsubscribe(roomPrefix + topic).catch(() => {});
          }
        }
        all.delete(ws);
        mine.delete(ws);
        if (mine.size === 0 && sockets.get(user) === mine) {
          sockets.delete(user);
          sub.unsubscribe(prefix + user).catch(() => {});
        }
      });
    });
  });

  // A join; anything else a client sends is ignored. `joined` only once the topic's channel is subscribed.
  async function join(ws, text, joined) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    const topic = frame && frame.type === 'join' ? frame.topic : undefined;
    if (typeof topic !== 'string' || !topic || joined.includes(topic)) return;
    let members = rooms.get(topic);
    if (!members) {
      members = new Set();
      rooms.set(topic, members);
      roomReady.set(topic, sub.subscribe(roomPrefix + topic, deliver(members), true));
    }
    members.add(ws);
    joined.push(topic);
    await roomReady.get(topic);
    ws.send(JSON.stringify({ type: 'joined', topic }));
  }

  async function handle(req, res) {
    const path = (req.url || '/').split('?', 1)[0];
    if (path === '/healthz') return send(res, 200, '{"status":"ok"}');
    const topics = path.startsWith('/topics/');
    if (req.method !== 'POST' || !(path === '/broadcast' || path.startsWith('/notify/') || topics)) {
      return send(res, 404, '{"error":"not_found"}');
    }
    const refusal = denied(req, verifyPublisher);
    if (refusal) return send(res, ...refusal);
    const body = parseNotification(await readBody(req));
    if (body === null) return send(res, 422, '{"error":"invalid_request"}');
    const ts = Date.now();
    if (topics) {
      const topic = decodePath(path.slice('/topics/'.length));
      const frame = JSON.stringify({ type: 'notification', topic, event: body.event, data: body.data ?? null, ts });
      await pub.publish(roomPrefix + topic, frame);
      return send(res, 202, JSON.stringify({ ts }));
    }
    const frame = JSON.stringify({ type: 'notification', event: body.event, data: body.data ?? null, ts });
    const channel = path === '/broadcast' ? everyone : prefix + decodePath(path.slice('/notify/'.length));
    await pub.publish(channel, frame);
    return send(res, 202, JSON.stringify({ ts }));
  }

  // The keepalive as `ws`'s documentation writes it, when BENCH_PING_INTERVAL (seconds) is set: every
  // interval each socket that answered the last ping gets a new one, and one that did not is cut. Off
  // otherwise, so that the other workloads' figures carry no keepalive.
  if (pingSeconds > 0) {
    setInterval(() => {
      for (const ws of all) {
        if (!ws.isAlive) {
          ws.terminate();
          continue;
        }
        ws.isAlive = false;
        ws.ping();
      }
    }, pingSeconds * 1000);
  }

  server.listen(Number(values.port), '127.0.0.1');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
