"""Lua run inside Redis, so each step is atomic: nothing is published without being stored."""

from __future__ import annotations

# KEYS: stream, channel, seq counter, clock, idempotency key, presence hash, live-replicas zset
# ARGV: event JSON, data JSON, max length, ttl ms, idempotency ttl ms, broadcast flag,
#       use-idempotency flag, replica liveness window ms
# Returns {id, duplicate (0/1), online (-1 for broadcasts)}.
PUBLISH = """
local function online()
  if ARGV[6] == '1' then return -1 end
  local t = redis.call('TIME')
  local oldest = tonumber(t[1]) * 1000 - tonumber(ARGV[8])
  local fields = redis.call('HGETALL', KEYS[6])
  local n = 0
  for i = 1, #fields, 2 do
    local seen = redis.call('ZSCORE', KEYS[7], fields[i])
    if seen and tonumber(seen) >= oldest then
      n = n + tonumber(fields[i + 1])
    else
      redis.call('HDEL', KEYS[6], fields[i])
    end
  end
  return n
end
if ARGV[7] == '1' then
  local first = redis.call('GET', KEYS[5])
  if first then return {first, 1, online()} end
end
local t = redis.call('TIME')
local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
if ms < last then ms = last else redis.call('SET', KEYS[4], string.format('%d', ms)) end
local seq = redis.call('INCR', KEYS[3])
local id = string.format('%d-%d', ms, seq)
local tail = '}'
if ARGV[6] == '1' then tail = ',"broadcast":true}' end
local frame = '{"type":"notification","id":"' .. id .. '","event":' .. ARGV[1] .. ',"data":' .. ARGV[2]
  .. ',"ts":' .. string.format('%d', ms) .. tail
local ttl = tonumber(ARGV[4])
local maxlen = tonumber(ARGV[3])
local length = redis.call('XLEN', KEYS[1])
local dropped = nil
if length >= maxlen then
  local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', length - maxlen + 1)
  dropped = oldest[#oldest][1]
end
redis.call('XADD', KEYS[1], 'MAXLEN', maxlen, id, 'f', frame)
-- Trimming does not record what it dropped; resume needs it to tell recovered from lost.
if dropped then redis.call('XSETID', KEYS[1], id, 'MAXDELETEDID', dropped) end
redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-0', ms - ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', KEYS[2], frame)
if ARGV[7] == '1' then redis.call('SET', KEYS[5], id, 'PX', ARGV[5]) end
return {id, 0, online()}
"""

_COMPARE = """
local function key(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function later(a, b)
  local ams, aseq = key(a)
  local bms, bseq = key(b)
  return ams > bms or (ams == bms and aseq > bseq)
end
"""

# KEYS: read marker, stream, user channel. ARGV: up_to id, ttl ms.
# Moves the marker forward (never past the newest entry), returns the unread count, and tells
# every socket of the user when the marker moved.
MARK_READ = (
    _COMPARE
    + """
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #newest == 0 then return 0 end
local target = ARGV[1]
if later(target, newest[1][1]) then target = newest[1][1] end
local marker = redis.call('GET', KEYS[1])
local moved = (not marker) or later(target, marker)
if moved then
  marker = target
  redis.call('SET', KEYS[1], marker, 'PX', ARGV[2])
end
local count = #redis.call('XRANGE', KEYS[2], '(' .. marker, '+')
if moved then redis.call('PUBLISH', KEYS[3], '{"type":"unread","count":' .. count .. '}') end
return count
"""
)

# KEYS: read marker, stream. Returns the unread count.
UNREAD = """
local marker = redis.call('GET', KEYS[1])
if marker then return #redis.call('XRANGE', KEYS[2], '(' .. marker, '+') end
return redis.call('XLEN', KEYS[2])
"""

# KEYS: clock, seq counter, live-replicas zset, probe channel.
# ARGV: replica id, forget-replicas-after ms, publish flag.
# Returns a mark: an id such that every notification published before this call has an id at or
# below it, and every one published after has a greater id (the newest id, or just below the
# current millisecond, whichever is later). With the publish flag, the mark is also published to
# this replica's probe channel: when it comes back, everything up to the mark has been received,
# so the mark is where a replay starts if the subscription breaks later. It also refreshes this
# replica's heartbeat and forgets replicas silent for long (killed ones never say goodbye).
MARK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clock = tonumber(redis.call('GET', KEYS[1]) or '0')
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local mark
if clock >= now - 1 then mark = string.format('%d-%d', clock, seq) else mark = string.format('%d-0', now - 1) end
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]))
  redis.call('PUBLISH', KEYS[4], mark)
end
return mark
"""
