"""Lua run inside Redis, so each step is atomic: nothing is published without being stored.

Every script touches the keys of one stream only, all carrying that stream's hash tag (see
RedisBroker._key), or one key of a namespace (ADMIT), so each runs in one slot of a Redis Cluster
as well as on a single Redis; PUBLISH_CHECKED alone (a publish that schedules its fallback's check
too) touches keys of two slots, and runs on a single Redis only.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: history, channel, last id, idempotency key, members.
# ARGV: event JSON, data JSON, max length, ttl ms, idempotency ttl ms, use-idempotency flag,
#       frame part after the id, frame tail, what to count: '=<user>' that user's sockets, '#' the
#       distinct members, '' nothing.
# Returns {id, duplicate (0/1), the count (-1 when nothing is counted)}.
_PUBLISH = """
local function online()
  if ARGV[9] == '' then return -1 end
  if ARGV[9] == '#' then return redis.call('HLEN', KEYS[5]) end
  return tonumber(redis.call('HGET', KEYS[5], string.sub(ARGV[9], 2)) or '0')
end
if ARGV[6] == '1' then
  local first = redis.call('GET', KEYS[4])
  if first then return {first, 1, online()} end
end
local ms, seq = now, 1
local last = redis.call('GET', KEYS[3])
if last then
  local lms, lseq = string.match(last, '^(%d+)-(%d+)$')
  seq = tonumber(lseq) + 1
  if ms < tonumber(lms) then ms = tonumber(lms) end
end
local id = string.format('%d-%d', ms, seq)
local ttl = tonumber(ARGV[4])
redis.call('SET', KEYS[3], id, 'PX', ttl)
local frame = '{"type":"notification","id":"' .. id .. '"' .. ARGV[7] .. ',"event":' .. ARGV[1] .. ',"data":'
  .. ARGV[2] .. ',"ts":' .. string.format('%d', ms) .. ARGV[8]
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
redis.call('SPUBLISH', KEYS[2], frame)
if ARGV[6] == '1' then redis.call('SET', KEYS[4], id, 'PX', ARGV[5]) end
"""
_PUBLISHED = "return {id, 0, online()}\n"
PUBLISH = _NOW + _PUBLISH + _PUBLISHED

# PUBLISH, and in the same step the due check of its fallback (the one round trip a publish costs;
# see base.PublishCheck and service/outbox/checks_redis.py, whose SCHEDULE this writes alike).
# KEYS: PUBLISH's, then the checks' due zset and payloads hash. ARGV: PUBLISH's, then the check's
# name but the id, delay ms, payload head, payload tail, state key prefix, keep ms. The state key
# is named from the id here, so it cannot be declared: a single Redis only, never a cluster.
PUBLISH_CHECKED = (
    _NOW
    + _PUBLISH
    + """
local check = ARGV[10] .. id
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[11]), check)
redis.call('HSET', KEYS[7], check, ARGV[12] .. id .. '","event":' .. ARGV[1] .. ',"data":' .. ARGV[2]
  .. ',"ts":' .. string.format('%d', ms) .. ARGV[13])
redis.call('SET', ARGV[14] .. check, 'pending', 'PX', ARGV[15])
"""
    + _PUBLISHED
)

# KEYS: last id. Returns a cursor: every notification of the stream published after this call
# has a greater id (the newest id, or just below the current millisecond, whichever is later).
CURSOR = (
    _NOW
    + """
local last = redis.call('GET', KEYS[1])
if last and tonumber(string.match(last, '^(%d+)-')) >= now - 1 then return last end
return string.format('%d-0', now - 1)
"""
)

# KEYS: last id. Returns {the newest id or '', the current unix ms}.
NEWEST = (
    _NOW
    + """
return {redis.call('GET', KEYS[1]) or '', now}
"""
)

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

# KEYS: read marker, history, channel. ARGV: up_to id, ttl ms.
# Moves the marker forward (never past the newest entry), and tells every socket of the user when
# it moved. Returns {the unread count (entries after the marker and young enough to be served),
# the marker it moved to or ''}.
MARK_READ = (
    _NOW
    + _COMPARE
    + """
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #newest == 0 then return {0, ''} end
local target = ARGV[1]
if later(target, newest[1][1]) then target = newest[1][1] end
local marker = redis.call('GET', KEYS[1])
local moved = (not marker) or later(target, marker)
if moved then
  marker = target
  redis.call('SET', KEYS[1], marker, 'PX', ARGV[2])
end
local floor = string.format('%d-0', now - tonumber(ARGV[2]))
local from = '(' .. marker
if later(floor, marker) then from = floor end
local count = #redis.call('XRANGE', KEYS[2], from, '+')
if moved then
  redis.call('SPUBLISH', KEYS[3], '{"type":"unread","count":' .. count .. '}')
  return {count, marker}
end
return {count, ''}
"""
)

# KEYS: read marker, history. ARGV: ttl ms. Returns the unread count.
UNREAD = (
    _NOW
    + _COMPARE
    + """
local floor = string.format('%d-0', now - tonumber(ARGV[1]))
local marker = redis.call('GET', KEYS[1])
local from = floor
if marker and later(marker, floor) then from = '(' .. marker end
return #redis.call('XRANGE', KEYS[2], from, '+')
"""
)

# Topic presence keys, in the order every presence script takes them: members (user -> sockets on
# every replica), a replica's members (user -> sockets there), leaving (user -> when their leave is
# due), channel, changes (user -> 'j' or 'l' since the last announcement), when the next
# announcement is due. ARGV[3]: events flag, ARGV[6]: topic JSON, ARGV[7]: ttl ms, ARGV[8]: the
# announcement interval ms, ARGV[9]: the member limit for named joins and leaves, ARGV[10]: '1'
# when someone watches presence (the webhooks): every join and leave is then also returned, as
# action, user, members after.
#
# Joins and leaves are not told one by one (a room of N joining would be N² frames): each is noted,
# a join and a leave of the same user within one interval cancel out, and one `presence` frame per
# interval carries them all (see ANNOUNCE).
_PRESENCE_EVENT = """
local changes = {}
local function note(action, user)
  if ARGV[10] == '1' then
    local told = 'leave'
    if action == 'j' then told = 'join' end
    for _, v in ipairs({told, user, redis.call('HLEN', KEYS[1])}) do changes[#changes + 1] = v end
  end
  if ARGV[3] ~= '1' then return end
  local pending = redis.call('HGET', KEYS[5], user)
  if pending and pending ~= action then
    redis.call('HDEL', KEYS[5], user)
  else
    redis.call('HSET', KEYS[5], user, action)
    redis.call('PEXPIRE', KEYS[5], ARGV[7])
  end
  redis.call('SET', KEYS[6], now + tonumber(ARGV[8]), 'NX', 'PX', ARGV[7])
end
-- When this stream next needs the sweep (a leave's grace ends, or an announcement is due); 0: never.
local function next_due()
  local due = tonumber(redis.call('GET', KEYS[6]) or '0')
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if #first > 0 and (due == 0 or tonumber(first[2]) < due) then due = tonumber(first[2]) end
  return due
end
"""

# KEYS: the topic presence keys. ARGV: user, sockets here now, events flag, grace ms, member cap
# (0: none), topic JSON, ttl ms, interval ms, member limit, watched flag.
# Returns {status, members, due, changes}: status 0 done, 1 refused (the cap); `due` (unix ms, 0:
# none) is when the stream needs the sweep: the caller registers it (DUE).
PRESENCE = (
    _NOW
    + _PRESENCE_EVENT
    + """
local user, n = ARGV[1], tonumber(ARGV[2])
local mine = tonumber(redis.call('HGET', KEYS[2], user) or '0')
local known = redis.call('HEXISTS', KEYS[1], user) == 1
local cap = tonumber(ARGV[5])
if n > 0 and not known and cap > 0 and redis.call('HLEN', KEYS[1]) >= cap then
  return {1, redis.call('HLEN', KEYS[1]), 0, changes}
end
if n == mine then return {0, redis.call('HLEN', KEYS[1]), next_due(), changes} end
if n > 0 then redis.call('HSET', KEYS[2], user, n) else redis.call('HDEL', KEYS[2], user) end
redis.call('PEXPIRE', KEYS[2], ARGV[7])
local total = tonumber(redis.call('HINCRBY', KEYS[1], user, n - mine))
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if total > 0 then
  -- Back within the grace: nobody was told they left, so nobody is told they joined.
  if redis.call('ZREM', KEYS[3], user) == 0 and not known then note('j', user) end
  return {0, redis.call('HLEN', KEYS[1]), next_due(), changes}
end
redis.call('HSET', KEYS[1], user, 0)
local grace = tonumber(ARGV[4])
if grace > 0 then
  redis.call('ZADD', KEYS[3], now + grace, user)
  redis.call('PEXPIRE', KEYS[3], ARGV[7])
  return {0, redis.call('HLEN', KEYS[1]), next_due(), changes}
end
redis.call('HDEL', KEYS[1], user)
redis.call('ZREM', KEYS[3], user)
note('l', user)
return {0, redis.call('HLEN', KEYS[1]), next_due(), changes}
"""
)

# KEYS: the topic presence keys. ARGV: unused, unused, events flag, unused, unused, topic JSON,
# ttl ms, interval ms, member limit for named joins and leaves, watched flag.
# Ends every leave whose grace is over (the user has no socket anywhere), then, once its interval
# is over, sends the announcement: one frame with the users who joined and left since the last one
# and the member count; above the limit, the count alone. Returns {the stream's next due time (0:
# none), changes}.
ANNOUNCE = (
    _NOW
    + _PRESENCE_EVENT
    + """
for _, user in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], user)
  if tonumber(redis.call('HGET', KEYS[1], user) or '0') <= 0 then
    redis.call('HDEL', KEYS[1], user)
    note('l', user)
  end
end
local due = redis.call('GET', KEYS[6])
if due and tonumber(due) <= now then
  redis.call('DEL', KEYS[6])
  local changes = redis.call('HGETALL', KEYS[5])
  redis.call('DEL', KEYS[5])
  if #changes > 0 then
    local count = redis.call('HLEN', KEYS[1])
    local frame = '{"type":"presence","topic":' .. ARGV[6]
    if count <= tonumber(ARGV[9]) then
      local joined, left = {}, {}
      for i = 1, #changes, 2 do
        if changes[i + 1] == 'j' then joined[#joined + 1] = changes[i] else left[#left + 1] = changes[i] end
      end
      table.sort(joined)
      table.sort(left)
      for i, user in ipairs(joined) do joined[i] = cjson.encode(user) end
      for i, user in ipairs(left) do left[i] = cjson.encode(user) end
      frame = frame .. ',"joined":[' .. table.concat(joined, ',') .. '],"left":[' .. table.concat(left, ',') .. ']'
    end
    redis.call('SPUBLISH', KEYS[4], frame .. ',"count":' .. count .. '}')
  end
end
return {next_due(), changes}
"""
)

# KEYS: the topic presence keys, the dead replica's members second. ARGV as ANNOUNCE's. Takes a
# replica that died without saying goodbye out of one stream: a user whose only sockets were there
# has left (their grace has passed while it was found dead). Returns {users reaped, next due, changes}.
REAP = (
    _NOW
    + _PRESENCE_EVENT
    + """
local gone = redis.call('HGETALL', KEYS[2])
for i = 1, #gone, 2 do
  local user = gone[i]
  local total = tonumber(redis.call('HINCRBY', KEYS[1], user, -tonumber(gone[i + 1])))
  if total <= 0 then
    redis.call('HDEL', KEYS[1], user)
    redis.call('ZREM', KEYS[3], user)
    note('l', user)
  end
end
redis.call('DEL', KEYS[2])
return {#gone / 2, next_due(), changes}
"""
)

# KEYS: live replicas (replica -> heartbeat ms). ARGV: replica id. Returns 1 when this replica was
# not there (first beat, or the others reaped it, or Redis lost its data): its presence must be
# written again.
HEARTBEAT = (
    _NOW
    + """
return redis.call('ZADD', KEYS[1], now, ARGV[1])
"""
)

# KEYS: live replicas. ARGV: silent for this many ms. Returns the replicas that stopped beating.
SILENT = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
"""
)

# KEYS: streams waiting for the sweep (stream -> when; a negative score: claimed by a sweeper
# until minus that time). ARGV: how long a claim lasts (ms), at most this many streams.
# Claims the streams that are due (and those whose claim ran out, its sweeper presumably gone), so
# that one replica sweeps each. Returns {the claim's score, streams}.
CLAIM = (
    _NOW
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], -now, now, 'LIMIT', 0, tonumber(ARGV[2]))
local claim = -(now + tonumber(ARGV[1]))
for _, stream in ipairs(due) do redis.call('ZADD', KEYS[1], claim, stream) end
return {claim, due}
"""
)

# KEYS: streams waiting for the sweep. ARGV: stream, when it is next due (0: not), the claim the
# caller held ('' for none). A writer's due time replaces a claim or a later time; a sweeper's
# replaces only its own claim, and otherwise keeps the earlier of the two.
DUE = """
local current = redis.call('ZSCORE', KEYS[1], ARGV[1])
local when = tonumber(ARGV[2])
if current and ARGV[3] ~= '' and tonumber(current) == tonumber(ARGV[3]) then
  if when > 0 then redis.call('ZADD', KEYS[1], when, ARGV[1]) else redis.call('ZREM', KEYS[1], ARGV[1]) end
elseif when > 0 and (not current or (ARGV[3] == '' and tonumber(current) < 0) or when < tonumber(current)) then
  redis.call('ZADD', KEYS[1], when, ARGV[1])
end
return 0
"""

# A namespace's topics holding history, scored by when a replica last admitted a publish to them.
# KEYS: the namespace's sorted set (its own hash tag, `n:<namespace>`). ARGV: topic, how long an
# admission lasts in ms (the history TTL and a margin), the namespace's max_topics.
# Returns 1 when the topic may be published to, 0 when the namespace is full without it.
ADMIT = (
    _NOW
    + """
local lasting = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - lasting)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lasting)
return 1
"""
)
