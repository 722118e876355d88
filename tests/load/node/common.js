'use strict';
// What both Node comparison servers share: JWT verification as the python servers do it, and the HTTP helpers.

const { parseArgs } = require('node:util');

const jwt = require('jsonwebtoken');

const PUBLISH_SCOPE = 'notify:publish';
const JSON_TYPE = 'application/json';

// The command line every bench server takes: `--port N --redis URL [--channel PREFIX]`, BENCH_SECRET in the
// environment; exits with usage otherwise.
function serverOptions(script, defaultChannel) {
  const { values } = parseArgs({
    options: {
      port: { type: 'string' },
      redis: { type: 'string' },
      channel: { type: 'string', default: defaultChannel },
    },
  });
  const secret = process.env.BENCH_SECRET;
  if (!values.port || !values.redis || !secret) {
    console.error(`usage: BENCH_SECRET=... node ${script} --port PORT --redis URL [--channel PREFIX]`);
    process.exit(2);
  }
  return { ...values, secret };
}

function verifier(secret) {
  return (token) => {
    if (typeof token !== 'string') throw new jwt.JsonWebTokenError('missing token');
    const claims = jwt.verify(token, secret, { algorithms: ['HS256'] });
    // jsonwebtoken checks `exp` only when the token has one; the python server requires it.
    if (typeof claims !== 'object' || claims === null || claims.exp === undefined) {
      throw new jwt.JsonWebTokenError('exp required');
    }
    return claims;
  };
}

// A 401/403 answer, or null when the request carries a publisher JWT.
function denied(req, verify) {
  const header = req.headers.authorization || '';
  const space = header.indexOf(' ');
  const scheme = space < 0 ? header : header.slice(0, space);
  const token = space < 0 ? '' : header.slice(space + 1);
  let claims;
  try {
    claims = verify(scheme.toLowerCase() === 'bearer' ? token : undefined);
  } catch {
    return [401, '{"error":"invalid_token"}'];
  }
  const scope = typeof claims.scope === 'string' ? claims.scope.split(/\s+/) : [];
  return scope.includes(PUBLISH_SCOPE) ? null : [403, '{"error":"forbidden"}'];
}

function send(res, status, body, type = JSON_TYPE) {
  res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseNotification(raw) {
  let body;
  try {
    body = JSON.parse(raw.toString('utf8'));
  } catch {
    return null;
  }
  const isObject = typeof body === 'object' && body !== null && !Array.isArray(body);
  return isObject && typeof body.event === 'string' ? body : null;
}

function decodePath(segment) {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment; // as Python's unquote: a malformed escape stays as written
  }
}

module.exports = { decodePath, denied, parseNotification, readBody, send, serverOptions, verifier };
