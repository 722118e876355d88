"""The Redis outbox's Lua: each step on a job is atomic, and touches one shard's keys only.

A shard's keys share its hash tag (`<prefix>:{ob3}:due`, ...), so every script runs in one slot of
a Redis Cluster as on one Redis. Per shard: `due` (zset id -> when due, ms), `lease` (zset id ->
when the lease runs out, ms), `dead` (zset id -> when it died), `jobs` (hash id -> payload), `meta`
(hash id -> `attempts|created ms|claim|destination|last error`), `stats` (hash: `p:<dest>` pending,
`d:` delivered, `f:` failed attempts, `x:` dead, `s:` last success ms, `e:` `ms|last error`, `z:`
why it is paused).
"""

from __future__ import annotations

from ..broker.redis.pipeline import Lua

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function parse(meta)
  return string.match(meta, '^(%d+)|(%d+)|([^|]*)|([^|]*)|(.*)$')
end
"""

# KEYS: due, jobs, meta, stats. ARGV: id, destination, payload, max pending (0: none).
# Returns 1 queued, 0 refused (over the bound).
ENQUEUE = Lua.of(
    _NOW
    + """
local bound = tonumber(ARGV[4])
if bound > 0 and tonumber(redis.call('HGET', KEYS[4], 'p:' .. ARGV[2]) or '0') >= bound then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], '0|' .. now .. '||' .. ARGV[2] .. '|')
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HINCRBY', KEYS[4], 'p:' .. ARGV[2], 1)
return 1
"""
)

# KEYS: due, lease, jobs, meta. ARGV: limit, lease ms, claim token.
# Jobs whose lease ran out (their replica died or hung) are due again first; then up to `limit`
# due jobs are leased to the caller. Returns a flat list: id, attempts, created, destination,
# last error, payload, for each.
CLAIM = Lua.of(
    _NOW
    + """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], now, id)
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  redis.call('ZREM', KEYS[1], id)
  local meta = redis.call('HGET', KEYS[4], id)
  local payload = redis.call('HGET', KEYS[3], id)
  if meta and payload then
    local a, c, _, d, e = parse(meta)
    redis.call('HSET', KEYS[4], id, a .. '|' .. c .. '|' .. ARGV[3] .. '|' .. d .. '|' .. e)
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
    for _, v in ipairs({id, a, c, d, e, payload}) do out[#out + 1] = v end
  end
end
return out
"""
)

# KEYS: due, lease, dead, jobs, meta, stats. ARGV: id, destination. Delivered: forgotten, by whoever
# delivered it (a lease that ran out while the answer was coming does not undo a success).
COMPLETE = Lua.of(
    _NOW
    + """
local id, d = ARGV[1], ARGV[2]
if redis.call('HDEL', KEYS[5], id) == 1 then
  redis.call('HDEL', KEYS[4], id)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if redis.call('ZREM', KEYS[3], id) == 1 then
    redis.call('HINCRBY', KEYS[6], 'x:' .. d, -1)
  else
    redis.call('HINCRBY', KEYS[6], 'p:' .. d, -1)
  end
end
redis.call('HINCRBY', KEYS[6], 'd:' .. d, 1)
redis.call('HSET', KEYS[6], 's:' .. d, now)
return 1
"""
)

_MINE = """
local meta = redis.call('HGET', KEYS[3], ARGV[1])
if not meta then return 0 end
local a, c, claim, d = parse(meta)
-- No longer ours: the lease ran out and the job went to another replica, which settles it.
if claim ~= ARGV[2] then return 0 end
local err = ARGV[3]
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], (tonumber(a) + 1) .. '|' .. c .. '||' .. d .. '|' .. err)
redis.call('HINCRBY', KEYS[4], 'f:' .. d, 1)
redis.call('HSET', KEYS[4], 'e:' .. d, now .. '|' .. err)
"""

# KEYS: lease, due, meta, stats. ARGV: id, claim token, error, delay ms. Due again after the delay.
RETRY = Lua.of(
    _NOW
    + _MINE
    + """
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
return 1
"""
)

# KEYS: lease, due, meta. ARGV: id, claim token, delay ms. Handed back unattempted (this replica
# stops, or the destination is at its share here): due again after the delay, for whoever claims next.
RELEASE = Lua.of(
    _NOW
    + """
local meta = redis.call('HGET', KEYS[3], ARGV[1])
if not meta then return 0 end
local a, c, claim, d, e = parse(meta)
if claim ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3] or '0'), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], a .. '|' .. c .. '||' .. d .. '|' .. e)
return 1
"""
)

# KEYS: lease, dead, meta, stats, jobs. ARGV: id, claim token, error, dead kept. Dead, kept for
# replay; the oldest dead beyond the bound are forgotten.
BURY = Lua.of(
    _NOW
    + _MINE
    + """
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HINCRBY', KEYS[4], 'p:' .. d, -1)
redis.call('HINCRBY', KEYS[4], 'x:' .. d, 1)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do
    redis.call('ZREM', KEYS[2], old)
    local m = redis.call('HGET', KEYS[3], old)
    if m then
      local _, _, _, od = parse(m)
      redis.call('HINCRBY', KEYS[4], 'x:' .. od, -1)
    end
    redis.call('HDEL', KEYS[3], old)
    redis.call('HDEL', KEYS[5], old)
  end
end
return 1
"""
)

# KEYS: dead, meta, jobs. ARGV: limit. The newest dead: id, died ms, meta, payload, for each.
DEAD = Lua.of(
    """
local out = {}
local found = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
for i = 1, #found, 2 do
  local id = found[i]
  local meta = redis.call('HGET', KEYS[2], id)
  local payload = redis.call('HGET', KEYS[3], id)
  if meta and payload then
    for _, v in ipairs({id, found[i + 1], meta, payload}) do out[#out + 1] = v end
  end
end
return out
"""
)

# KEYS: dead, due, meta, stats. ARGV: '*' (every dead job) or the ids. Queued again, due now, with
# fresh attempts. Returns how many were.
REPLAY = Lua.of(
    _NOW
    + """
local ids = ARGV
if ARGV[1] == '*' then ids = redis.call('ZRANGE', KEYS[1], 0, -1) end
local n = 0
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local meta = redis.call('HGET', KEYS[3], id)
    if meta then
      local _, c, _, d, e = parse(meta)
      redis.call('HSET', KEYS[3], id, '0|' .. c .. '||' .. d .. '|' .. e)
      redis.call('ZADD', KEYS[2], now, id)
      redis.call('HINCRBY', KEYS[4], 'x:' .. d, -1)
      redis.call('HINCRBY', KEYS[4], 'p:' .. d, 1)
      n = n + 1
    end
  end
end
return n
"""
)

# KEYS: stats. The shard's whole stats hash.
STATS = Lua.of("return redis.call('HGETALL', KEYS[1])")

# KEYS: stats. ARGV: field, value ('' deletes it).
SET_STAT = Lua.of(
    """
if ARGV[2] == '' then return redis.call('HDEL', KEYS[1], ARGV[1]) end
return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
"""
)
